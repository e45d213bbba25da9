"""Built-in sampler over diffusers schedulers: `lcsc_ray.diffusers_sampling:sample`.

It keeps the LCSC sampler protocol, `sample(model, n, seed, nfe, batch_size, **kwargs) -> images` in [-1, 1]
of shape (n, C, H, W), and runs the loop every diffusers pipeline runs (DDIMPipeline, ConsistencyModelPipeline):

    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:                      # nfe of them
        out = model(scheduler.scale_model_input(x, t), t, class_labels=...).sample
        x = scheduler.step(out, t, x, generator=...).prev_sample

The scheduler is chosen by name; its config comes from `scheduler_config` (a file or folder), else from the
run's `scheduler/scheduler_config.json` that `lcsc_ray.diffusers_checkpoints:build_model` found, else the
scheduler's defaults. All noise (initial, then per step) comes from one CPU generator seeded with `seed`, so a
sample set depends on (seed, n, batch_size) and not on the device; with deterministic schedulers (DDIM at
eta 0, DPM-Solver, Euler) the initial noise alone decides it, whatever the batch size.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from schemas.errors import SpecError

SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "DPMSolverMultistep": "DPMSolverMultistepScheduler",
    "Euler": "EulerDiscreteScheduler",
    "EulerDiscrete": "EulerDiscreteScheduler",
    "CMStochasticIterative": "CMStochasticIterativeScheduler",
}
NAMED_PARAMETERS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def accepted_keys(scheduler_class: type) -> list[str]:
    """The config keys a diffusers scheduler class accepts: its `__init__`'s named parameters."""
    parameters = inspect.signature(scheduler_class.__init__).parameters.values()
    return sorted(p.name for p in parameters if p.name != "self" and p.kind in NAMED_PARAMETERS)


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class of a short name ('DDIM', ...) or class name; refuses any other."""
    import diffusers

    class_name = SCHEDULERS.get(name.removesuffix("Scheduler"), name) if isinstance(name, str) else None
    if class_name not in SCHEDULERS.values():
        raise SpecError(
            f"`sampler.kwargs.scheduler` is {name!r}; choose one of {sorted(SCHEDULERS)}",
            source="sampler.kwargs.scheduler",
        )
    return getattr(diffusers, class_name)


def _check_overrides(cls: type, overrides: object) -> None:
    field = "sampler.kwargs.scheduler_kwargs"
    if not isinstance(overrides, dict):
        raise SpecError(
            f"`{field}` must be a mapping of scheduler config keys, got {type(overrides).__name__}",
            source=field,
        )
    known = accepted_keys(cls)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SpecError(
            f"`{field}` has {', '.join(map(repr, unknown))}, which {cls.__name__} does not take; "
            f"{cls.__name__} accepts {known}: fix or remove the key",
            source=field,
        )


def check_kwargs(kwargs: dict) -> None:
    """Refuse, before any sampling, a `sampler.kwargs` whose scheduler name or `scheduler_kwargs` keys the
    scheduler would not take (`sample`'s keyword arguments, as the spec gives them)."""
    _check_overrides(scheduler_class(kwargs.get("scheduler", "DDIM")), kwargs.get("scheduler_kwargs") or {})


def make_scheduler(name: str, config: dict | None = None, overrides: dict | None = None):
    """A diffusers scheduler by short name ('DDIM', 'DPMSolverMultistep', 'Euler', 'CMStochasticIterative') or
    class name, from `config` (e.g. the run's DDPMScheduler config) with `overrides` on top. An override the
    scheduler does not accept is refused, naming the keys it does."""
    cls = scheduler_class(name)
    _check_overrides(cls, overrides or {})
    # a training config (DDPMScheduler's) carries keys another scheduler does not know: keep the shared ones
    known = set(accepted_keys(cls))
    merged = {k: v for k, v in {**(config or {}), **(overrides or {})}.items() if k in known}
    return cls.from_config(merged)


def _labels(class_labels: int | Sequence[int] | None, n: int) -> torch.Tensor | None:
    if class_labels is None:
        return None
    labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
    if not labels:
        raise SpecError(
            "`sampler.kwargs.class_labels` is empty; give a label or a list of labels",
            source="sampler.kwargs.class_labels",
        )
    return torch.tensor([labels[i % len(labels)] for i in range(n)], dtype=torch.long)  # cycled over samples


def _denoiser(
    model: torch.nn.Module,
    labels: torch.Tensor | None,
    guidance_scale: float,
    null_label: int | None,
    context: torch.Tensor | None,
):
    """model(x, t) -> output, with classifier-free guidance (Ho & Salimans 2022, Eq. 6) when scale != 1."""

    def call(x: torch.Tensor, t, y: torch.Tensor | None) -> torch.Tensor:
        kwargs = {"class_labels": y}
        if context is not None:
            kwargs["encoder_hidden_states"] = context.expand(len(x), *context.shape[1:])
        return model(x, t, **kwargs).sample

    if guidance_scale == 1.0 or labels is None:
        return lambda x, t: call(x, t, labels)
    if null_label is None:
        raise SpecError(
            "`sampler.kwargs.guidance_scale` != 1 needs `null_class_label` (the label trained as 'no class')",
            source="sampler.kwargs.null_class_label",
        )

    def guided(x: torch.Tensor, t) -> torch.Tensor:
        both = call(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, null_label)]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided


def _context(model: torch.nn.Module) -> torch.Tensor | None:
    """UNet2DConditionModel needs encoder_hidden_states: zeros (1, 1, cross_attention_dim), unconditional."""
    dim = getattr(model.config, "cross_attention_dim", None)
    if dim is None or type(model).__name__ != "UNet2DConditionModel":
        return None
    return torch.zeros(1, 1, dim if isinstance(dim, int) else dim[0])


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    n: int,
    seed: int,
    nfe: int,
    batch_size: int,
    scheduler: str = "DDIM",
    scheduler_config: str | None = None,
    scheduler_kwargs: dict | None = None,
    class_labels: int | list[int] | None = None,
    guidance_scale: float = 1.0,
    null_class_label: int | None = None,
    dtype: str = "float32",
    step_kwargs: dict | None = None,
) -> torch.Tensor:
    """`n` images (n, C, H, W) in [-1, 1] from a diffusers UNet with `nfe` steps of the named scheduler.

    `scheduler_kwargs` override config entries (e.g. {'timestep_spacing': 'trailing'}); `class_labels` (one or
    a list, cycled) feed class-conditional models; `dtype` 'float16'/'bfloat16' runs the model in that
    precision under autocast (on a GPU); `step_kwargs` go to every `scheduler.step` (e.g. DDIM's
    {'use_clipped_model_output': True})."""
    from lcsc_ray.diffusers_checkpoints import scheduler_config as read_config

    config = (
        read_config(scheduler_config) if scheduler_config else getattr(model, "lcsc_scheduler_config", None)
    )
    device = next(model.parameters()).device
    shape = (model.config.in_channels, *_size(model.config.sample_size))
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((n, *shape), generator=generator)  # (n, C, H, W), drawn before any step noise
    labels = _labels(class_labels, n)
    context = _context(model)
    out = []
    for start in range(0, n, batch_size):
        sched = make_scheduler(scheduler, config, scheduler_kwargs)
        sched.set_timesteps(nfe)
        x = noise[start : start + batch_size].to(device) * sched.init_noise_sigma
        y = None if labels is None else labels[start : start + batch_size].to(device)
        denoise = _denoiser(
            model, y, guidance_scale, null_class_label, None if context is None else context.to(device)
        )
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32"):
            for t in sched.timesteps:
                model_out = denoise(sched.scale_model_input(x, t), t)
                x = sched.step(
                    model_out.float(), t, x, generator=generator, **(step_kwargs or {})
                ).prev_sample
        out.append(x.float().clamp(-1, 1))
    return torch.cat(out)


def _size(sample_size: int | Sequence[int]) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
