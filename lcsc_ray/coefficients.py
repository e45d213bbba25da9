"""Coefficient vectors for combining K checkpoints: parametrisations and the search's seed vectors.

LCSC (Liu et al., ICLR 2025, Sec. 3) uses theta = sum_i alpha_i theta_i with sum_i alpha_i = 1.
Two parametrisations of alpha are searched:

- "difference" (the default): theta = theta_K + sum_{i<K} x_i (theta_i - theta_K), i.e. the paper's
  difference form anchored at the last checkpoint. K-1 free values; x = 0 is the last checkpoint and
  alpha = (x_1, ..., x_{K-1}, 1 - sum x) sums to 1 by construction.
- "normalized": K free values w, alpha = w / sum(w).
"""

from __future__ import annotations

import numpy as np

from schemas.search import SearchSpec

PARAMETRIZATIONS = ("difference", "normalized")


def num_free(num_checkpoints: int, parametrization: str) -> int:
    """How many free values the optimiser searches for K checkpoints."""
    _check_parametrization(parametrization)
    return num_checkpoints - 1 if parametrization == "difference" else num_checkpoints


def _check_parametrization(parametrization: str) -> None:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"unknown parametrization {parametrization!r}; allowed: {', '.join(PARAMETRIZATIONS)}"
        )


def to_alphas(free: np.ndarray | list[float], parametrization: str) -> np.ndarray:
    """Map the optimiser's free values to combination coefficients alpha (length K, sum 1)."""
    _check_parametrization(parametrization)
    x = np.asarray(free, dtype=np.float64)
    if parametrization == "difference":
        # theta_K + sum_{i<K} x_i (theta_i - theta_K)  =>  alpha_i = x_i, alpha_K = 1 - sum x   (LCSC, Sec. 3)
        return np.append(x, 1.0 - x.sum())
    total = x.sum()
    if abs(total) < 1e-12:
        raise ValueError("normalized coefficients sum to zero and cannot be renormalised to sum 1")
    return x / total


# Below this sum, renormalising free values blows them up (a sum near 0 sends every alpha towards +-inf): such a
# proposal is scored as failed, with its reason, rather than evaluated.
MIN_NORMALIZED_SUM = 0.05


def normalized_sum_problem(free: np.ndarray | list[float], parametrization: str) -> str | None:
    """Why the free values cannot be renormalised ('normalized' only, sum below MIN_NORMALIZED_SUM), else None."""
    if parametrization != "normalized":
        return None
    total = float(np.sum(np.asarray(free, dtype=np.float64)))
    if total < MIN_NORMALIZED_SUM:
        return (
            f"normalized coefficients sum to {total:.4g}, below {MIN_NORMALIZED_SUM}: renormalising them "
            "to sum 1 would blow them up"
        )
    return None


def from_alphas(alphas: np.ndarray | list[float], parametrization: str) -> np.ndarray:
    """Inverse of `to_alphas`: the free values that give `alphas` (which must sum to 1)."""
    _check_parametrization(parametrization)
    a = np.asarray(alphas, dtype=np.float64)
    if not np.isclose(a.sum(), 1.0, atol=1e-6):
        raise ValueError(f"coefficients must sum to 1, they sum to {a.sum():.6g}")
    return a[:-1].copy() if parametrization == "difference" else a.copy()


def last_checkpoint(num_checkpoints: int) -> np.ndarray:
    """One-hot on the last checkpoint."""
    alphas = np.zeros(num_checkpoints)
    alphas[-1] = 1.0
    return alphas


def uniform(num_checkpoints: int) -> np.ndarray:
    """Equal weights (a uniform model soup)."""
    return np.full(num_checkpoints, 1.0 / num_checkpoints)


def ema_shaped(num_checkpoints: int, decay: float) -> np.ndarray:
    """The weights an EMA over the saved checkpoints would give: alpha_i ∝ (1-decay) decay^(K-i),
    with the oldest checkpoint absorbing the remaining mass (an EMA initialised at theta_1)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
    k = num_checkpoints
    powers = decay ** np.arange(k - 1, -1, -1, dtype=np.float64)  # decay^(K-i) for i = 1..K
    alphas = (1.0 - decay) * powers
    alphas[0] = powers[0]  # the initial value theta_1 keeps decay^(K-1)
    return alphas / alphas.sum()


def seed_vectors(
    num_checkpoints: int, spec: SearchSpec, extra: list[tuple[str, np.ndarray]] | None = None
) -> list[tuple[str, np.ndarray]]:
    """The search's seeds: the last checkpoint, any `extra` (the best post-hoc EMA), EMA-shaped vectors for each
    decay, the uniform soup; duplicates dropped, at most `search.budget` of them."""
    seeds = [("last", last_checkpoint(num_checkpoints)), *(extra or [])]
    seeds += [(f"ema@{d:g}", ema_shaped(num_checkpoints, d)) for d in spec.search.ema_decays]
    seeds.append(("uniform", uniform(num_checkpoints)))
    unique: list[tuple[str, np.ndarray]] = []
    for label, alphas in seeds:
        if not any(np.allclose(alphas, other) for _, other in unique):
            unique.append((label, alphas))
    return unique[: spec.search.budget]
