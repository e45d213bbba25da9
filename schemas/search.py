"""LCSC search: the spec a user writes (`SearchSpec`) and the result a search writes (`SearchResult`)."""

from __future__ import annotations

import os
from itertools import pairwise
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, model_validator

from schemas.common import OutputSpec, PluginSpec, RaySpec, StrictModel
from schemas.search_rules import (
    BUILTINS,
    DIFFUSERS_MODEL,
    DIFFUSERS_SAMPLER,
    MNIST_MODEL,
    MNIST_SAMPLER,
    builtin_family,
    seeds_of_two_checkpoints,
)

# A score that may be non-finite (a diverged model scores inf). In result.json it is a number, or one of the strings
# "Infinity", "-Infinity", "NaN" (`ResultModel`): JSON has no such numbers, and null would not read back.
Score = Annotated[
    float, WithJsonSchema({"anyOf": [{"type": "number"}, {"enum": ["Infinity", "-Infinity", "NaN"]}]})
]
Optimizer = Literal[
    "CMA",
    "TwoPointsDE",
    "DE",
    "NGOpt",
    "PSO",
    "OnePlusOne",
    "MetaModel",
    "MetaModelOnePlusOne",
    "SQP",
    "ChainMetaModelSQP",
]
FidelityScore = Literal["raw", "extrapolated"]
Parametrization = Literal["difference", "normalized"]


class CheckpointSetSpec(StrictModel):
    """Which saved checkpoints are combined, and how they are read."""

    uri: str = Field(
        default="outputs/mnist-ddpm/checkpoints",
        description="Directory or prefix holding the checkpoints: local path, file:// or s3://bucket/prefix.",
    )
    glob: str = Field(
        default="*.safetensors", description="File-name pattern under `uri` (ignored with `paths`)."
    )
    paths: list[str] | None = Field(
        default=None,
        min_length=2,
        description="Explicit checkpoint files (full URIs, or names relative to `uri`), at least two, in "
        "combination order; overrides `glob`.",
    )
    key: str | None = Field(
        default=None,
        description="Select a state dict inside a dict checkpoint, e.g. 'model' or 'ema'. None: the file is one.",
    )
    last: int | None = Field(
        default=None, ge=2, description="Keep only the last N checkpoints by training step. None keeps all."
    )
    ema_uri: str | None = Field(
        default=None,
        description="The training run's own EMA weights, evaluated as a baseline when given.",
    )
    ema_key: str | None = Field(
        default=None,
        description="Select the state dict inside `ema_uri` (e.g. 'ema' when the EMA sits beside the model in one "
        "file). None uses `key`.",
    )
    storage_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="dtype of the flattened checkpoints in the object store; bfloat16 halves memory.",
    )
    format: Literal["files", "diffusers"] = Field(
        default="files",
        description="'files': checkpoint files matched by `glob` (or `paths`) under `uri`. 'diffusers': the "
        "`checkpoint-N/` folders a diffusers training script saves under `uri` (weights in "
        "`checkpoint-N/<subfolder>/diffusion_pytorch_model.safetensors`, else, for a non-EMA subfolder, an "
        "accelerate `checkpoint-N/model.safetensors`), step N from the folder name; `paths` then names folders.",
    )
    subfolder: str = Field(
        default="unet",
        description="With format 'diffusers': the model folder inside each checkpoint ('unet', or 'unet_ema' "
        "to combine the EMA snapshots; a checkpoint without that EMA folder is refused, never read from the "
        "non-EMA model.safetensors). `ema_uri` may then name a `unet_ema` folder.",
    )
    placement: Literal["auto", "node", "sharded", "stream"] = Field(
        default="auto",
        description="Where the checkpoint set is kept while it is combined. 'node': the whole set in the object "
        "store of every evaluator node (fastest while it fits). 'sharded': the flat parameter vector cut into one "
        "shard per node, each node holding its shard of every checkpoint; a combination is one task per shard, "
        "run where the shard lives. 'stream': nothing in the object store; each evaluator combines tensor by "
        "tensor from the safetensors files (S3 files cached on local disk). 'auto': 'node' when the set fits "
        "every node's object store, else 'sharded' when the cluster's object stores hold it, else 'stream'. "
        "Every mode gives the same combined weights, bit for bit; 'sharded' and 'stream' need safetensors files.",
    )


class SamplerSpec(PluginSpec):
    """The sampling function `sample(model, n, seed, nfe, batch_size) -> images` and its step count."""

    target: str = Field(
        default=MNIST_SAMPLER,
        description="Import path of the sampler. Left out, the default of `checkpoints.format`: the MNIST recipe's "
        f"DDIM ({MNIST_SAMPLER}) for 'files', the diffusers scheduler sampler ({DIFFUSERS_SAMPLER}) for "
        "'diffusers'.",
    )
    nfe: int = Field(default=10, ge=1, description="Number of function evaluations per sample.")


class ReferenceSpec(StrictModel):
    """Reference statistics that FID compares against."""

    stats_uri: str | None = Field(
        default=None,
        description="An .npz with `mu` and `sigma` (pytorch-fid convention). Overrides `dataset`.",
    )
    dataset: PluginSpec | None = Field(
        default_factory=lambda: PluginSpec(target="lcsc_ray.recipes.mnist:reference_images"),
        description="A callable returning reference images (N, C, H, W) in [-1, 1]; its statistics are "
        "computed once and cached under the output URI.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ReferenceSpec:
        if self.stats_uri is None and self.dataset is None:
            raise ValueError("set `reference.stats_uri` (an .npz with mu, sigma) or `reference.dataset`")
        return self


class EvaluatorSpec(StrictModel):
    """The pool of FID evaluator actors."""

    num_actors: int = Field(
        default=2,
        ge=1,
        description="The most evaluator actors the pool runs; also the most concurrent trials. On an autoscaling "
        "cluster the pool asks for this many and grows as nodes join.",
    )
    min_actors: int = Field(
        default=1,
        ge=1,
        description="Evaluators the pool needs before the search starts (at most `num_actors`): it starts with "
        "what fits, waits a bounded time for at least this many, then grows and shrinks with the cluster.",
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per evaluator actor.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per evaluator actor (fractions allowed).")
    batch_size: int = Field(default=250, ge=1, description="Sampling and feature batch size.")
    torch_threads: int = Field(
        default=1, ge=1, description="torch threads per actor (1 avoids oversubscription)."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="Precision of sampling: 'float16' or 'bfloat16' run the sampler under torch.autocast on the "
        "evaluator's device (a GPU with `num_gpus` > 0); combination and features stay float32.",
    )
    split_min_samples: int | None = Field(
        default=10000,
        ge=2,
        description="Evaluations of at least this many samples are split across every evaluator: each computes "
        "a share of the chunks (the same noise as one evaluator would draw) and the FID statistics are merged. "
        "None never splits.",
    )
    evaluation_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds one evaluation may take before its evaluator is killed and replaced and the candidate "
        "retried once elsewhere. Default: 5x the slowest timed evaluation so far (per sample, scaled by sample count), at least 60 s.",
    )
    max_replacements: int = Field(
        default=4,
        ge=0,
        description="Evaluators the pool may replace after they crashed or hung while their node was alive, before "
        "the search stops naming the cause. Evaluators lost with their node (a spot reclaim, a drain) are "
        "replaced without counting here.",
    )
    max_failed_evaluations: int = Field(
        default=3,
        ge=1,
        description="Evaluations that fail with an error (not a lost evaluator; such errors are not retried) "
        "before the search stops with that error.",
    )

    @model_validator(mode="after")
    def _min_within_num(self) -> EvaluatorSpec:
        if self.min_actors > self.num_actors:
            raise ValueError(
                f"`evaluators.min_actors` ({self.min_actors}) exceeds `evaluators.num_actors` ({self.num_actors}); "
                "lower `min_actors` or raise `num_actors` (the most evaluators the pool runs)"
            )
        return self


class FIDSpec(StrictModel):
    """How each candidate is scored."""

    features: PluginSpec = Field(
        default_factory=lambda: PluginSpec(target="lcsc_ray.recipes.mnist:feature_network"),
        description="Builder of the feature extractor: an nn.Module mapping images in [-1, 1] to (B, d). For "
        "standard FID use `lcsc_ray.inception:fid_inception_v3` (pytorch-fid's InceptionV3, pool3, 2048-d) with "
        "kwargs `weights_uri` (pt_inception-2015-12-05-6726825d.pth, which you supply), optional `sha256`, and "
        "`quantize` (uint8 levels, default true). The default is the MNIST recipe's classifier.",
    )
    num_samples: int = Field(default=500, ge=2, description="Samples per candidate during the search.")
    seed: int = Field(default=0, description="Noise seed of the search; every candidate sees the same noise.")
    holdout_seeds: list[int] = Field(
        default_factory=lambda: [1001, 1002, 1003],
        description="Noise seeds, unseen by the search, for re-scoring the winner and the baselines.",
    )
    holdout_num_samples: int | None = Field(
        default=None, ge=2, description="Samples per held-out re-score; None uses `num_samples`."
    )
    reference: ReferenceSpec = Field(default_factory=ReferenceSpec, description="Reference statistics.")

    @model_validator(mode="after")
    def _holdout_seeds_are_unseen(self) -> FIDSpec:
        if self.seed in self.holdout_seeds:
            raise ValueError(
                f"`fid.holdout_seeds` must not contain the search seed `fid.seed` ({self.seed}): "
                "a held-out seed is one the search never saw"
            )
        repeated = sorted({s for s in self.holdout_seeds if self.holdout_seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"`fid.holdout_seeds` repeats {repeated}; each held-out seed must be distinct")
        return self


class SearchAlgoSpec(StrictModel):
    """The evolutionary search over combination coefficients."""

    optimizer: Optimizer = Field(default="CMA", description="Nevergrad optimiser.")
    parametrization: Parametrization = Field(
        default="difference",
        description="'difference': theta_K + sum x_i (theta_i - theta_K), K-1 free values, zero = last "
        "checkpoint; 'normalized': K free values renormalised to sum 1.",
    )
    budget: int = Field(
        default=48, ge=1, description="Exact number of candidate evaluations (seeds included)."
    )
    bound: float = Field(default=3.0, gt=0, description="Each free coefficient lies in [-bound, bound].")
    sigma: float = Field(default=0.15, gt=0, description="Initial step size of the optimiser.")
    ema_decays: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95],
        description="Decays of the EMA-shaped seed vectors (per saved checkpoint, not per training step).",
    )
    fidelity_schedule: list[Annotated[int, Field(ge=2)]] | None = Field(
        default=None,
        description="Multi-fidelity sample counts, e.g. [500, 2000]: candidates are screened with the first, "
        "the best `keep_fraction` re-scored with each next one.",
    )
    keep_fraction: float = Field(default=0.25, gt=0, le=1, description="Fraction kept at each fidelity rung.")
    eta: int | None = Field(
        default=None,
        ge=2,
        description="Asynchronous rungs (ASHA, Ray Tune's AsyncHyperBandScheduler over the samples drawn): a "
        "candidate goes on to the next count of `fidelity_schedule` when it is in the best 1/eta of those "
        "scored at its count so far, and a promotion draws only the samples it adds. The schedule must grow by "
        "the factor eta, e.g. [128, 512] with eta 4. None: synchronous successive halving with `keep_fraction`.",
    )
    fidelity_score: FidelityScore = Field(
        default="raw",
        description="What the optimiser is told and ranks by: 'raw' FID at the candidate's sample count, or "
        "'extrapolated', FID at infinite samples fitted from the FID of the whole, halves and quarters of its "
        "samples (FID_n = FID_inf + c/n; needs a first sample count of an even number of evaluator batches, 4 or "
        "more for the quarters).",
    )
    rescore_top_k: int = Field(
        default=3,
        ge=1,
        description="Best candidates re-scored at the final sample count; the winner is the best of them on the "
        "search seed. When the search already ranked them at that count, only the best one is re-scored.",
    )

    @model_validator(mode="after")
    def _schedule_increases(self) -> SearchAlgoSpec:
        sched = self.fidelity_schedule
        if sched is not None and (len(sched) < 2 or any(b <= a for a, b in pairwise(sched))):
            raise ValueError(
                "`search.fidelity_schedule` must hold at least two strictly increasing sample counts"
            )
        return self

    @model_validator(mode="after")
    def _schedule_grows_by_eta(self) -> SearchAlgoSpec:
        sched = self.fidelity_schedule
        if self.eta is None:
            return self
        if sched is None:
            raise ValueError("`search.eta` needs `search.fidelity_schedule` (the sample counts of its rungs)")
        if any(b != a * self.eta for a, b in pairwise(sched)):
            raise ValueError(
                f"`search.fidelity_schedule` {sched} must grow by the factor `search.eta` ({self.eta}) from rung to "
                f"rung, e.g. {[sched[0] * self.eta**i for i in range(len(sched))]}"
            )
        return self

    @model_validator(mode="after")
    def _budget_holds_the_seeds(self) -> SearchAlgoSpec:
        # the seeds are evaluated first and are the baselines; a smaller budget would drop some. The exact count
        # depends on the number of checkpoints (checked once they are listed: lcsc_ray.run_identity.check_budget)
        needed = seeds_of_two_checkpoints(self.ema_decays)
        if self.budget < needed:
            raise ValueError(
                f"`search.budget` ({self.budget}) is smaller than the {needed} seed vectors (the last checkpoint, "
                "one per `search.ema_decays` value, the uniform soup) that even two checkpoints give: the seeds "
                f"past the budget, and the baselines they report, would be dropped; set `search.budget` to at "
                f"least {needed} plus the evaluations the optimiser should get, or remove decays"
            )
        return self


# sigma_rel of a power-function EMA with exponent 0 (a uniform average); wider profiles need exponents < 0
MAX_SIGMA_REL = 0.2886


class PosthocEmaSpec(StrictModel):
    """Post-hoc EMA (EDM2, Karras et al. 2024) as a baseline and a seed: power-function EMA snapshots saved
    during training are combined into the EMA of each `sigma_rels` value at the last checkpoint's step; the best
    on the search seed is reported as `best-posthoc-ema-<sigma_rel>` and seeds the search."""

    uri: str = Field(
        default="outputs/mnist-ddpm/posthoc_ema",
        description="Folder holding the snapshots (local path, file:// or s3://), each a .safetensors file with "
        "`step` and `gamma` (or `sigma_rel`) in its metadata, as the built-in recipes save under `posthoc_ema/`.",
    )
    glob: str = Field(default="*.safetensors", description="File-name pattern of the snapshots under `uri`.")
    sigma_rels: list[Annotated[float, Field(gt=0, lt=MAX_SIGMA_REL)]] = Field(
        default_factory=lambda: [0.025, 0.05, 0.075, 0.10, 0.15, 0.20],
        min_length=1,
        description="The sigma_rel grid (EMA length relative to training time, 0 < sigma_rel < 0.2886) of the "
        "reconstructed EMAs.",
    )
    step: int | None = Field(
        default=None,
        ge=1,
        description="Training step the EMAs are rebuilt at; None: the last checkpoint's step. Snapshots after it "
        "are not used.",
    )


class SearchSpec(StrictModel):
    """An LCSC search: combine saved checkpoints with coefficients found by evolutionary search."""

    kind: Literal["search"] = Field(default="search", description="Spec kind; 'search' for LCSC.")
    name: str = Field(default="lcsc-search", description="Human-readable run name.")
    seed: int = Field(default=0, description="Seed of the optimiser.")
    ray: RaySpec = Field(default_factory=RaySpec, description="Ray connection and resources.")
    checkpoints: CheckpointSetSpec = Field(
        default_factory=CheckpointSetSpec, description="Checkpoints to combine."
    )
    model: PluginSpec = Field(
        default_factory=lambda: PluginSpec(target=MNIST_MODEL),
        description="Builder of the model skeleton the combined weights are loaded into. Left out, the default of "
        f"`checkpoints.format`: {MNIST_MODEL} for 'files', {DIFFUSERS_MODEL} (from the run's config.json) for "
        "'diffusers'.",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec, description="Sampler and NFE.")
    fid: FIDSpec = Field(default_factory=FIDSpec, description="FID scoring.")
    evaluators: EvaluatorSpec = Field(default_factory=EvaluatorSpec, description="Evaluator actor pool.")
    search: SearchAlgoSpec = Field(default_factory=SearchAlgoSpec, description="Search algorithm and budget.")
    posthoc_ema: PosthocEmaSpec | None = Field(
        default=None,
        description="Post-hoc EMA baseline and seed from power-EMA snapshots (EDM2); off when absent.",
    )
    output: OutputSpec = Field(
        default_factory=lambda: OutputSpec(uri="outputs/lcsc-search"), description="Result location."
    )

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, data: object) -> object:
        # the model and sampler follow `checkpoints.format` where the spec leaves them (or the sampler's target)
        # unset: diffusers checkpoints bring their own model config and scheduler, read by the diffusers built-ins
        if not isinstance(data, dict):
            return data
        checkpoints = data.get("checkpoints")
        get = (
            checkpoints.get
            if isinstance(checkpoints, dict)
            else lambda name, default=None: getattr(checkpoints, name, default)
        )
        if checkpoints is None or get("format") != "diffusers":
            return data
        data = dict(data)
        data.setdefault(
            "model",
            {
                "target": DIFFUSERS_MODEL,
                "kwargs": {
                    "config_uri": get("uri", CheckpointSetSpec().uri),
                    "subfolder": get("subfolder") or "unet",
                },
            },
        )
        data.setdefault("sampler", {"target": DIFFUSERS_SAMPLER, "kwargs": {"scheduler": "DDIM"}})
        sampler = data["sampler"]
        if isinstance(sampler, dict) and "target" not in sampler:
            data["sampler"] = {**sampler, "target": DIFFUSERS_SAMPLER}
        elif isinstance(sampler, SamplerSpec) and "target" not in sampler.model_fields_set:
            data["sampler"] = SamplerSpec(**{**sampler.model_dump(), "target": DIFFUSERS_SAMPLER})
        return data

    @model_validator(mode="after")
    def _plugins_fit_format(self) -> SearchSpec:
        # the MNIST recipe's U-Nets cannot load a diffusers UNet's weights, and each built-in sampler calls only
        # the model of its own family (the recipe's returns a tensor, diffusers' an output with `.sample`)
        plugins = {"model": self.model, "sampler": self.sampler}
        if self.checkpoints.format == "diffusers":
            for field, plugin in plugins.items():
                if builtin_family(plugin.target) == "MNIST recipe":
                    raise ValueError(
                        f"`{field}.target` is the MNIST recipe's {plugin.target}, which does not work with "
                        f"`checkpoints.format: diffusers` (a diffusers UNet); set `{field}.target` to "
                        f"{BUILTINS['diffusers'][field]} (or leave `{field}` out: the format's default), or set "
                        "`checkpoints.format: files` for checkpoints the MNIST recipe saved"
                    )
        families = {field: builtin_family(plugin.target) for field, plugin in plugins.items()}
        if None not in families.values() and families["model"] != families["sampler"]:
            field = "model" if "model" not in self.model_fields_set else "sampler"
            other = "sampler" if field == "model" else "model"
            wanted = families[other]
            raise ValueError(
                f"`{field}.target` ({plugins[field].target}) is the {families[field]} {field}, but "
                f"`{other}.target` ({plugins[other].target}) is the {wanted} {other}, and they do not work "
                f"together; set `{field}.target` to the {wanted} {field} ({BUILTINS[wanted][field]}), or give "
                f"your own `{field}.target`"
            )
        return self

    @model_validator(mode="after")
    def _extrapolation_has_halves(self) -> SearchSpec:
        # FID_inf is fitted from the FID of the whole, the halves and the quarters of the first rung's chunks
        search, batch = self.search, self.evaluators.batch_size
        first = search.fidelity_schedule[0] if search.fidelity_schedule else self.fid.num_samples
        chunks = -(-first // batch)
        if search.fidelity_score == "extrapolated" and (chunks < 2 or chunks % 2):
            raise ValueError(
                f"`search.fidelity_score: extrapolated` fits FID_inf from the halves and quarters of the first "
                f"sample count ({first}), which is {chunks} batch(es) of `evaluators.batch_size` ({batch}); it "
                f"needs an even number of batches (4 or more for quarters): set `evaluators.batch_size` to "
                f"{max(1, first // 4)} or less, or `search.fidelity_score: raw`"
            )
        return self

    @model_validator(mode="after")
    def _output_outside_checkpoints(self) -> SearchSpec:
        # the search writes combined.safetensors and state there: inside the set they would be read back
        output, folder = _comparable(self.output.uri), _comparable(self.checkpoints.uri)
        if output == folder or output.startswith(folder.rstrip("/") + "/"):
            raise ValueError(
                f"`output.uri` ({self.output.uri}) lies inside `checkpoints.uri` ({self.checkpoints.uri}): the "
                "search's own files would mix with the checkpoints; choose an `output.uri` outside that folder"
            )
        return self


def _comparable(uri: str) -> str:
    """A URI in a form where one folder's URI prefixes its contents' (local paths made absolute)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


class ResultModel(StrictModel):
    """Base of the result models: a non-finite float is written to JSON as "Infinity", "-Infinity" or "NaN"
    (a string, read back as that float), so a result with a diverged score round-trips."""

    model_config = ConfigDict(**StrictModel.model_config, ser_json_inf_nan="strings")


class CandidateScore(ResultModel):
    """One coefficient vector and its FID."""

    label: str = Field(description="What the vector is: 'lcsc', 'last', 'ema@0.9', 'uniform', 'run-ema', ...")
    coefficients: list[float] = Field(
        description="Per-checkpoint weights alpha_i (sum to 1); empty for the run's own EMA weights."
    )
    fid: Score = Field(
        description='FID at the search\'s sample count and seed ("Infinity": no finite score).'
    )
    num_samples: int = Field(description="Samples behind `fid`.")
    holdout_fids: list[Score] = Field(default_factory=list, description="FID on each held-out seed.")


class PairedComparison(ResultModel):
    """LCSC's winner against one baseline over the shared held-out seeds (same noise on both sides)."""

    baseline: str = Field(description="Label of the baseline compared with.")
    mean_difference: Score = Field(
        description='Mean over held-out seeds of FID(lcsc) - FID(baseline); < 0 favours LCSC ("NaN" '
        "with no held-out seed)."
    )
    low: float | None = Field(
        description="Lower end of the 95% Student-t interval of the mean difference; None "
        "with fewer than two held-out seeds."
    )
    high: float | None = Field(description="Upper end of that interval.")
    num_seeds: int = Field(description="Held-out seeds behind the comparison.")
    verdict: str = Field(
        description="'LCSC beat X' or 'X beat LCSC' when the interval excludes 0, else 'tie'."
    )


class PosthocEmaScore(ResultModel):
    """One post-hoc EMA of the grid, rebuilt from the snapshots and scored on the search seed."""

    sigma_rel: float = Field(description="Relative EMA length of the rebuilt profile.")
    gamma: float = Field(description="Exponent of its power function (EDM2 Eq. 126).")
    step: int = Field(description="Training step it was rebuilt at.")
    fid: Score = Field(
        description='FID on the search seed at the final sample count ("Infinity": no finite score).'
    )
    snapshot_coefficients: list[float] = Field(
        description="Weight of each snapshot (`snapshots` order), summing "
        "to 1: the least-squares fit of the target profile."
    )


class SearchResult(ResultModel):
    """What a finished search writes to `output.uri/result.json`."""

    spec: SearchSpec = Field(description="The spec that produced this result.")
    checkpoint_names: list[str] = Field(description="Checkpoints in combination order (by step).")
    checkpoint_steps: list[int] = Field(description="Training step of each checkpoint.")
    best: CandidateScore = Field(description="The best candidate found by the search.")
    baselines: list[CandidateScore] = Field(description="Last, best sparse-EMA, uniform, and the run's EMA.")
    gain_found: bool = Field(
        description="True when the best candidate is no seed vector and beat every baseline: "
        "each paired interval over the held-out seeds lies below 0."
    )
    comparisons: list[PairedComparison] = Field(
        default_factory=list,
        description="The winner against each baseline: paired differences with 95% intervals.",
    )
    num_evaluations: int = Field(description="Candidate evaluations run (equals the budget).")
    placement: dict[str, str] = Field(
        default_factory=dict,
        description="Where the checkpoint set was kept while combined ('mode': node, sharded or stream) and why "
        "('reason'), see `checkpoints.placement`.",
    )
    num_failed: int = Field(default=0, description="Trials recorded as failed.")
    search_samples: int = Field(
        default=0,
        description="Samples drawn for the search's candidates (screening and promotions; a promotion draws "
        "only what it adds), as trials.parquet's `samples_spent`.",
    )
    total_samples: int = Field(
        default=0,
        description="Samples generated by the search's evaluations (trials, rungs, final scores), "
        "each counted once across resumes.",
    )
    posthoc_ema: list[PosthocEmaScore] = Field(
        default_factory=list,
        description="The post-hoc EMA grid on the search seed (with `posthoc_ema` in the spec).",
    )
    posthoc_snapshots: list[str] = Field(
        default_factory=list, description="The snapshots the post-hoc EMAs combine, in coefficient order."
    )
    wall_time_s: float = Field(description="Wall-clock seconds of the whole search.")
    cluster_timeline: dict | None = Field(
        default=None,
        description="When the cluster's nodes changed during the search (an autoscaling or spot cluster): node "
        "joins, leaves (with the reason, e.g. `reclaim`) and drains, and samples of nodes by type, evaluators "
        "alive and evaluations done, against seconds since the search started (rayops/cluster_timeline.py).",
    )
    files: dict[str, str] = Field(default_factory=dict, description="Artifact name -> URI.")
    versions: dict[str, str] = Field(default_factory=dict, description="Package versions.")
