"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3 and Appendix C; equation numbers as in the arXiv version and NVIDIA's `phema.py`).

Training keeps power-function EMAs: the EMA at step t weighs the weights of step tau with the profile
p_gamma,t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on 0 < tau <= t, and its width relative to t is
sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))           (Eq. 123).
Snapshots (gamma_i, t_i) of two such EMAs are saved during training; afterwards an EMA of any
(sigma_rel, t) is rebuilt as sum_i x_i snapshot_i, x the least-squares fit of its profile by the snapshots'
profiles: A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target>, inner products in closed form (Eq. 151,
Algorithm 3).

Here the solve is our own (about 100 lines, float64 numpy) rather than `ema-pytorch`'s `PostHocEMA`: that class
owns training-time EMA copies, its own file naming and its own torch combination, while the search needs only the
coefficients, which go through `lcsc_ray.combine` and the evaluator pool like every other candidate; and it would
add a dependency. The training side is `PowerEMA` below (used by the built-in recipes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked EMAs
SNAPSHOT_FOLDER = (
    "posthoc_ema"  # beside a recipe's checkpoints/ folder, so the checkpoints' glob never matches them
)
MAX_SIGMA_REL = 1.0 / (
    2.0 * np.sqrt(3.0)
)  # sigma_rel at gamma = 0 (a uniform average); wider needs gamma < 0


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> float | np.ndarray:
    """Relative standard deviation of the power-function profile with exponent `gamma` (EDM2 Eq. 123)."""
    g = np.float64(gamma)
    return np.sqrt(g + 1) / ((g + 2) * np.sqrt(g + 3))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has `sigma_rel` (EDM2 Eq. 126, Algorithm 2): the largest real root
    of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (exclusive), got {sigma_rel}")
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(step: int, gamma: float) -> float:
    """The power-EMA decay of update number `step` (1-based): beta_t = (1 - 1/t)^(gamma + 1) (EDM2 Eq. 127 with
    t_delta = 1). beta_1 = 0, so the EMA starts at the first step's weights."""
    if step < 1:
        raise ValueError(f"power-EMA steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> = integral of p_gamma_a,t_a(tau) p_gamma_b,t_b(tau) over tau (EDM2 Eq. 151); broadcasts.
    For t_a <= t_b: (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * (t_a / t_b)^g_b / t_b, and symmetrically."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio_exponent = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** ratio_exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float, target_gamma: float
) -> np.ndarray:
    """Coefficients x (one per snapshot, summing to 1) with sum_i x_i p_i closest to the target profile in L2:
    A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_target> (EDM2 Algorithm 3), then normalised to sum 1 as
    Algorithm 3 does. Solved by least squares, so duplicate snapshots (a singular A) still get a solution."""
    steps = np.asarray(snapshot_steps, dtype=np.float64).reshape(-1)
    gammas = np.broadcast_to(np.asarray(snapshot_gammas, dtype=np.float64), steps.shape)
    if steps.size == 0 or np.any(steps <= 0):
        raise ValueError(f"snapshot steps must be positive and at least one is needed, got {steps.tolist()}")
    a = profile_inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_inner_products(steps, gammas, np.float64(target_step), np.float64(target_gamma))
    # scale rows and columns by 1/sqrt(diag): the same solution, a far better conditioned system
    scale = 1.0 / np.sqrt(np.diag(a))
    y, *_ = np.linalg.lstsq(a * scale[:, None] * scale[None, :], b * scale, rcond=1e-13)
    x = y * scale
    return x / x.sum()


def profile_mass(gamma: float, step: float, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of the power profile (gamma, step) over each interval [lo, hi]: its mass and its first moment in units
    of `step` (integrals of p and of p * tau / step), in closed form, stable for any gamma."""
    u_lo = np.clip(np.asarray(lo, np.float64) / step, 0.0, 1.0)
    u_hi = np.clip(np.asarray(hi, np.float64) / step, 0.0, 1.0)
    mass = u_hi ** (gamma + 1) - u_lo ** (gamma + 1)
    moment = (gamma + 1) / (gamma + 2) * (u_hi ** (gamma + 2) - u_lo ** (gamma + 2))
    return mass, moment


def checkpoint_coefficients(gamma: float, step: float, checkpoint_steps: Sequence[int]) -> np.ndarray:
    """The power-EMA profile (gamma, step) projected on checkpoints saved at `checkpoint_steps`: alpha_i is the
    profile's integral against the hat function of checkpoint i (1 at its step, falling linearly to 0 at its
    neighbours'; the first checkpoint takes everything before it, the last everything after). This is exact when
    the weights move linearly between checkpoints, and the alphas sum to 1."""
    s = np.asarray(checkpoint_steps, dtype=np.float64)
    alphas = np.zeros(len(s))
    before, _ = profile_mass(gamma, step, np.array([0.0]), s[:1])
    after, _ = profile_mass(gamma, step, s[-1:], np.array([np.inf]))
    alphas[0] += before[0]
    alphas[-1] += after[0]
    lo, hi = s[:-1], s[1:]
    mass, moment = profile_mass(gamma, step, lo, hi)
    # on [s_i, s_i+1]: the rising hat of checkpoint i+1 is (tau - s_i) / (s_i+1 - s_i), the falling one of i is 1 - it
    rising = (step * moment - lo * mass) / (hi - lo)
    alphas[1:] += rising
    alphas[:-1] += mass - rising
    return alphas / alphas.sum()


class PowerEMA:
    """Power-function EMAs of a model's floating-point weights, one per sigma_rel, updated after each step
    (EDM2 Sec. 3.1): ema <- beta_t ema + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1)."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        state = model.state_dict()
        self.emas = [{k: v.detach().clone() for k, v in state.items()} for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based); non-float buffers are copied."""
        state = model.state_dict()
        for gamma, ema in zip(self.gammas, self.emas):
            weight = 1.0 - power_beta(step, gamma)
            for key, value in state.items():
                if value.is_floating_point():
                    ema[key].lerp_(value.detach(), weight)
                else:
                    ema[key].copy_(value)

    def state_dict(self) -> dict:
        """The EMAs and their sigma_rels, for a resumable training state."""
        return {"sigma_rels": list(self.sigma_rels), "emas": [dict(ema) for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (the sigma_rels must match)."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"stored power EMAs have sigma_rels {state['sigma_rels']}, this run {self.sigma_rels}"
            )
        for ema, stored in zip(self.emas, state["emas"]):
            for key in ema:
                ema[key].copy_(stored[key])

    def snapshots(self) -> list[tuple[float, float, dict[str, torch.Tensor]]]:
        """(sigma_rel, gamma, state dict) of each EMA, to save beside a checkpoint."""
        return list(zip(self.sigma_rels, self.gammas, self.emas))


def snapshot_name(sigma_rel: float, step: int) -> str:
    """File name of the power-EMA snapshot of `sigma_rel` at `step`: phema-0.050-000100.safetensors."""
    return f"phema-{sigma_rel:.3f}-{step:06d}.safetensors"


def snapshot_metadata(sigma_rel: float, gamma: float, step: int) -> dict[str, str]:
    """The safetensors metadata that makes a snapshot usable by a search: its step, gamma and sigma_rel."""
    return {
        "step": str(int(step)),
        "gamma": repr(float(gamma)),
        "sigma_rel": repr(float(sigma_rel)),
        "weights": f"power-ema@{sigma_rel:g}",
    }


# ------------------------------------------------------------------------------------- the search's side


@dataclass
class Snapshot:
    """One saved power-EMA snapshot: where it is, its training step and exponent."""

    uri: str
    step: int
    gamma: float


def _snapshot_header(uri: str) -> dict[str, str]:
    """The metadata of a snapshot's safetensors header (a ranged read, bounded by the file's size)."""
    from lcsc_ray import checkpoint_formats
    from rayops import storage

    field = "posthoc_ema.uri"
    size, _ = storage.stat(uri)
    length = checkpoint_formats.header_length(storage.read_range(uri, 0, 8), size, uri, field)
    header = checkpoint_formats.parse_header(
        storage.read_range(uri, 8, length), size - 8 - length, uri, field
    )
    return header.get("__metadata__") or {}


def read_snapshot(uri: str) -> Snapshot:
    """A snapshot's step and gamma from its metadata (`gamma`, else `sigma_rel`); the error names the fix."""
    from schemas.errors import CheckpointError

    meta = _snapshot_header(uri)
    try:
        step = int(meta["step"])
        gamma = float(meta["gamma"]) if "gamma" in meta else sigma_rel_to_gamma(float(meta["sigma_rel"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"post-hoc EMA snapshot {uri} has no usable `step` and `gamma` (or `sigma_rel`) in its safetensors "
            f"metadata ({type(exc).__name__}: {exc}); save snapshots with `posthoc_ema.snapshot_metadata`, or "
            "narrow `posthoc_ema.glob` to the snapshot files"
        ) from None
    if step < 1 or not gamma > 0:
        raise CheckpointError(
            f"post-hoc EMA snapshot {uri} has step {step} and gamma {gamma}; both must be positive"
        )
    return Snapshot(uri, step, gamma)


def list_snapshots(uri: str, glob: str, target_step: int) -> list[Snapshot]:
    """The snapshots under `uri` matching `glob` with step <= `target_step`, by (step, gamma)."""
    from rayops import storage
    from schemas.errors import CheckpointError, StorageError

    try:
        uris = storage.list_uris(uri, glob, recursive=False)
    except StorageError as exc:
        raise CheckpointError(f"cannot list `posthoc_ema.uri` {uri}: {exc}") from exc
    snapshots = sorted((read_snapshot(u) for u in uris), key=lambda s: (s.step, s.gamma, s.uri))
    usable = [s for s in snapshots if s.step <= target_step]
    if not usable:
        raise CheckpointError(
            f"no post-hoc EMA snapshots at or before step {target_step} match {glob!r} in {uri} (found "
            f"{len(snapshots)} in all); check `posthoc_ema.uri`, `posthoc_ema.glob` and `posthoc_ema.step`"
        )
    return usable


def grid_coefficients(
    snapshots: Sequence[Snapshot], sigma_rels: Sequence[float], target_step: int
) -> dict[float, np.ndarray]:
    """sigma_rel -> snapshot coefficients of the post-hoc EMA rebuilt at `target_step` (Algorithm 3)."""
    steps, gammas = [s.step for s in snapshots], [s.gamma for s in snapshots]
    return {
        float(sigma): solve_coefficients(steps, gammas, target_step, sigma_rel_to_gamma(sigma))
        for sigma in sigma_rels
    }


def posthoc_label(sigma_rel: float) -> str:
    """How results name the best post-hoc EMA baseline: best-posthoc-ema-0.100."""
    return f"best-posthoc-ema-{sigma_rel:.3f}"


def seed_label(sigma_rel: float) -> str:
    """How the trials table names the post-hoc EMA's seed vector over the checkpoints: phema@0.100."""
    return f"phema@{sigma_rel:.3f}"


@dataclass
class PosthocPlan:
    """The snapshots a search combines (loaded after its checkpoints) and each grid value's coefficients."""

    snapshots: list[Snapshot]
    target_step: int
    coefficients: dict[float, np.ndarray]  # sigma_rel -> one weight per snapshot

    def job_alphas(self, sigma_rel: float, num_checkpoints: int) -> list[float]:
        """The evaluator's coefficient vector: zero on every checkpoint, then the snapshots' weights."""
        return [0.0] * num_checkpoints + [float(x) for x in self.coefficients[sigma_rel]]


def load_snapshots(spec, checkpoint_set) -> PosthocPlan:
    """List the spec's snapshots (`posthoc_ema`), solve the grid, and put each snapshot in the object store
    beside the checkpoints (`checkpoint_set.extra_refs`), checked against the checkpoints' layout."""
    from lcsc_ray.checkpoints import _put_checked, check_fits, checkpoint_name, object_store_capacity

    block = spec.posthoc_ema
    target = block.step or checkpoint_set.steps[-1]
    snapshots = list_snapshots(block.uri, block.glob, target)
    layout = checkpoint_set.layout
    check_fits(layout.nbytes * len(snapshots), object_store_capacity(), len(snapshots), layout.storage_dtype)
    for snapshot in snapshots:
        ref, _ = _put_checked(
            snapshot.uri, None, layout, checkpoint_set.uris[0], layout.storage_dtype, "posthoc_ema.uri"
        )
        checkpoint_set.extra_refs.append(ref)
        checkpoint_set.extra_names.append(checkpoint_name(snapshot.uri))
    checkpoint_set.nbytes += layout.nbytes * len(snapshots)
    return PosthocPlan(snapshots, target, grid_coefficients(snapshots, block.sigma_rels, target))


def score_grid(pool, plan: PosthocPlan, num_checkpoints: int, num_samples: int, seed: int) -> list[dict]:
    """Each grid value's post-hoc EMA scored through the evaluator pool (a combination of the snapshots):
    [{sigma_rel, gamma, step, fid, snapshot_coefficients}], fid inf where the evaluation failed."""
    from lcsc_ray.evaluation_records import Job
    from rayops.progress import ProgressLine

    sigmas = list(plan.coefficients)
    jobs = [Job.of(plan.job_alphas(sigma, num_checkpoints), num_samples, seed) for sigma in sigmas]
    records = pool.score(jobs, ProgressLine(f"post-hoc EMA grid ({num_samples} samples)", total=len(jobs)))
    return [
        {
            "sigma_rel": sigma,
            "gamma": sigma_rel_to_gamma(sigma),
            "step": plan.target_step,
            "fid": record["fid"] if record["status"] == "ok" else float("inf"),
            "snapshot_coefficients": [float(x) for x in plan.coefficients[sigma]],
        }
        for sigma, record in zip(sigmas, records)
    ]


def best_of_grid(scores: Sequence[dict]) -> dict | None:
    """The grid entry with the lowest finite FID, or None when none scored."""
    finite = [s for s in scores if np.isfinite(s["fid"])]
    return min(finite, key=lambda s: s["fid"]) if finite else None


def seed_vector(best: dict, checkpoint_steps: Sequence[int]) -> np.ndarray | None:
    """The best post-hoc EMA as a seed over the checkpoints: its target profile projected on them
    (`checkpoint_coefficients`); None when the checkpoints carry no increasing positive steps."""
    steps = np.asarray(checkpoint_steps, dtype=np.float64)
    if len(steps) < 2 or steps[0] < 1 or np.any(np.diff(steps) <= 0):
        return None
    return checkpoint_coefficients(best["gamma"], best["step"], steps)
