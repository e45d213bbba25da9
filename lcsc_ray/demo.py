"""`make demo` / `lcsc-ray demo`: train (or reuse) the built-in MNIST DDPM, then run an LCSC search over its
checkpoints on the local Ray, and print last / run EMA / best sparse-EMA / uniform / LCSC side by side."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from lcsc_ray.plugins import build
from lcsc_ray.recipes.train import DDPMTrainConfig, train_on_ray
from lcsc_ray.report import format_table
from lcsc_ray.search import run_search
from rayops import storage
from rayops.cpu_steal import read_cpu_times, steal_fraction
from rayops.session import ray_session
from schemas.loader import load_spec
from schemas.search import PluginSpec, SearchResult, SearchSpec

log = logging.getLogger(__name__)
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "examples" / "search_mnist.yaml"
DEMO_TRAIN_STEPS = (
    1250  # fewer steps cost the margin: at 1,000 the last checkpoint is still at FID ~150 (README)
)
WARM_TIMEOUT_S = 600.0  # the background feature-network build; past this the search builds the network itself
DEMO_CHECKPOINTS = 25  # one every 50 steps; the spec searches the last 12 of them


def demo_training_config(out: str, train_steps: int | None = None) -> DDPMTrainConfig:
    """The demo's DDPM run: DEMO_TRAIN_STEPS steps (or `train_steps`), saving DEMO_CHECKPOINTS checkpoints
    evenly, so a shortened run still has the checkpoints its search spec's `last:` asks for."""
    steps = train_steps or DEMO_TRAIN_STEPS
    return DDPMTrainConfig(out=out, steps=steps, checkpoint_every=max(1, steps // DEMO_CHECKPOINTS))


def training_output(spec: SearchSpec) -> str:
    """The recipe's output directory: the parent of the spec's checkpoint directory."""
    return spec.checkpoints.uri.rstrip("/").rsplit("/", 1)[0]


def training_cpus() -> float:
    """Every CPU of the connected Ray (the search starts after training, so training may use them all)."""
    import ray

    return max(1.0, float(ray.cluster_resources().get("CPU", 1.0)))


def _build_feature_network(features: PluginSpec) -> str:
    build(features, "fid.features")
    return features.target


def warm_feature_network(spec: SearchSpec):
    """Build the spec's feature network in a background task while the DDPM trains (the training task leaves
    part of a core idle), so the search finds it in the on-disk cache instead of training it then. Returns the
    task's ref; a failure there only costs the time saved (the search builds the network itself)."""
    import ray

    return (
        ray.remote(num_cpus=0)(_build_feature_network)
        .options(name="warm_feature_network")
        .remote(spec.fid.features)
    )


def wait_warmed(ref) -> str | None:
    """Wait for `warm_feature_network`'s task: the plug-in's target, or None (logged) if it failed."""
    import ray

    try:
        return ray.get(ref, timeout=WARM_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - the search builds (and reports on) the network itself
        log.warning(
            "building the feature network ahead of the search failed (%s: %s); the search builds it",
            type(exc).__name__,
            exc,
        )
        return None


def run_demo(spec: SearchSpec, train_steps: int | None = None) -> SearchResult:
    """Train or reuse the checkpoints the spec points at, then search; one local Ray serves both."""
    started, cpu_before = time.monotonic(), read_cpu_times()
    with ray_session(spec.ray):
        config = demo_training_config(training_output(spec), train_steps)
        log.info(
            "step 1/2: DDPM checkpoints in %s (reused if already trained; resumed if interrupted)", config.out
        )
        warmed = warm_feature_network(spec)
        summary = train_on_ray("ddpm", config, num_cpus=training_cpus())
        wait_warmed(warmed)
        log.info(
            "training done: %s steps, %s checkpoints, %s s on %s torch threads",
            summary.get("steps"),
            summary.get("num_checkpoints"),
            summary.get("wall_s"),
            summary.get("torch_threads"),
        )
        log.info(
            "step 2/2: LCSC search, %d evaluations on %d evaluator actors",
            spec.search.budget,
            spec.evaluators.num_actors,
        )
        search_started = time.monotonic()
        result = run_search(spec)
        search_s = time.monotonic() - search_started
    stolen = steal_fraction(cpu_before, read_cpu_times())
    log.info(
        "demo finished in %.0f s (training %.0f s, search %.0f s; load average %.1f; CPU stolen by the host %s)",
        time.monotonic() - started,
        search_started - started,
        search_s,
        os.getloadavg()[0],
        "unknown" if stolen is None else f"{stolen:.0%}",
    )
    return result


def describe(result: SearchResult, spec: SearchSpec) -> str:
    """The table plus where everything was written."""
    out = spec.output.uri
    lines = [format_table(result), "", f"outputs in {out}:"]
    for name in (
        "result.json",
        "trials.parquet",
        "combined.safetensors",
        "fid_vs_evaluations.png",
        "coefficients.png",
    ):
        lines.append(f"  {storage.join(out, name)}")
    if "samples.png" in result.files:
        lines.append(f"  samples (LCSC, last, EMA, best baseline; same noise): {result.files['samples.png']}")
    lines.append(
        f"  sample grids: {storage.join(training_output(spec), 'samples.png')} (EMA), "
        f"{storage.join(training_output(spec), 'samples_last.png')} (last checkpoint)"
    )
    return "\n".join(lines)


def load_demo_spec(path: str | Path | None = None, budget: int | None = None) -> SearchSpec:
    """The demo's spec (examples/search_mnist.yaml unless given), with an optional budget override."""
    spec = load_spec(path or DEFAULT_SPEC, SearchSpec)
    if budget:
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"budget": budget})})
    return spec
