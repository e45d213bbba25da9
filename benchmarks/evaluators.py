"""Evaluator actors: evaluations per second against the number of evaluators, memory per extra actor
(zero-copy object-store checkpoints vs a copying baseline), and the Frechet distance at d=2048 against scipy's
sqrtm. Run from the repository root:

    .venv/bin/python benchmarks/evaluators.py [--quick] [--throughput-only] [--counts 1 2] [--gpu]

Throughput runs the production path: a small diffusers UNet2DModel (about the MNIST recipe's size) saved as
diffusers checkpoints, DDIM sampling, evaluations dispatched by the evaluator pool; with --gpu the evaluators
share one GPU (1/n of it each).

RSS counts the shared object-store pages an actor has touched, so it grows by the whole set even when
nothing is copied; USS (private pages) and PSS (shared pages split among their users) show what each
extra actor really costs. Growth is measured from just after construction to after one evaluation (which
reads every checkpoint value).

Runtime: see `wall_time_s` in the result JSON (the full run uses an 8 x 12.5M-parameter set and d=2048;
--quick a 4 x 5M set and d=512).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness

from lcsc_ray.evaluator import Evaluator
from lcsc_ray.placement import device_sources
from rayops.session import ray_session
from schemas.common import RaySpec


class BigModel(nn.Module):
    """One big flat parameter (the checkpoint payload) and images that depend on its first values."""

    def __init__(self, numel: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.w[:64].view(1, 1, 8, 8))


def big_model(numel: int) -> nn.Module:
    """Model plug-in."""
    return BigModel(numel)


def sample(model: nn.Module, n: int, seed: int, nfe: int, batch_size: int) -> torch.Tensor:
    """Sampler plug-in: seeded noise through the model, squashed to [-1, 1]."""
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.tanh(model(x))


def features(dim: int = 16, image: int = 8) -> nn.Module:
    """Features plug-in: a fixed projection of (B, 1, image, image) images."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(image * image, dim))


def _memory() -> dict:
    import psutil

    info = psutil.Process().memory_full_info()
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss}


class MeasuredEvaluator(Evaluator):
    """The production evaluator, with its memory recorded before construction (imports already done)."""

    def __init__(self, *args, **kwargs):
        self.memory_at_start = _memory()
        super().__init__(*args, **kwargs)

    def growth(self) -> dict:
        """Memory now minus memory before construction."""
        now = _memory()
        return {f"{m}_growth": now[m] - self.memory_at_start[m] for m in now} | {
            f"{m}_after": now[m] for m in now
        }


class CopyingEvaluator(MeasuredEvaluator):
    """Baseline: copies every checkpoint into private memory, as a naive actor would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        node = self.weights.checkpoints  # `node` placement: private copies in place of the object-store views
        node.arrays = [np.array(a) for a in node.arrays]
        node.sources = device_sources(node.arrays, self.device)


def write_diffusers_run(root: Path, num: int = 4) -> Path:
    """`num` checkpoint-N/unet folders of a small random UNet2DModel (28x28, 1 channel), nearby weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    for step in range(1, num + 1):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn_like(p))
        unet.save_pretrained(root / f"checkpoint-{step}" / "unet")
    return root


def throughput(count: int, gpu: bool, jobs: int, samples: int, run: Path, out: Path) -> dict:
    """Evaluations per second of the evaluator pool with `count` evaluators (1 CPU, or 1/count GPU, each)."""
    from lcsc_ray.checkpoints import load_checkpoint_set
    from lcsc_ray.pool import EvaluatorPool, Job
    from schemas.search import SearchSpec

    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(run), "format": "diffusers"},
            "sampler": {
                "target": "lcsc_ray.diffusers_sampling:sample",
                "nfe": 10,
                "kwargs": {"scheduler": "DDIM"},
            },
            "fid": {"features": {"target": "benchmarks.evaluators:features", "kwargs": {"image": 28}}},
            "evaluators": {
                "num_actors": count,
                "num_cpus": 1,
                "num_gpus": 1 / count if gpu else 0,
                "batch_size": samples,
                "split_min_samples": None,
            },
            "output": {"uri": str(out)},
        }
    )
    checkpoint_set = load_checkpoint_set(spec.checkpoints)
    pool = EvaluatorPool(spec, checkpoint_set, (np.zeros(16), np.eye(16)))
    try:
        pool.probe(samples, 0)  # warm-up: every evaluator's first call is not timed below
        pool.score([Job.of([0.25] * 4, samples, seed) for seed in range(1, count)])
        start = time.perf_counter()
        records = pool.score([Job.of([0.25] * 4, samples, 100 + i) for i in range(jobs)])
        seconds = time.perf_counter() - start
    finally:
        pool.close()
    assert all(r["status"] == "ok" for r in records), records
    return {
        "evaluators": count,
        "device": "gpu" if gpu else "cpu",
        "jobs": jobs,
        "samples": samples,
        "seconds": seconds,
        "evaluations_per_s": jobs / seconds,
    }


def speedups(rows: list[dict]) -> list[dict]:
    """The throughput rows with each one's evaluations/s over the first count's of the same seed."""
    first = {}
    for row in rows:
        first.setdefault(row["seed"], row["evaluations_per_s"])
    return [row | {"speedup_vs_1": row["evaluations_per_s"] / first[row["seed"]]} for row in rows]


def memory_rows(k: int, numel: int) -> list[dict]:
    """Start 2 actors per mode, evaluate once, report memory growth per actor."""
    import ray

    from lcsc_ray.checkpoints import CheckpointSet, Layout
    from schemas.search import SearchSpec

    spec = SearchSpec.model_validate(
        {
            "model": {"target": "benchmarks.evaluators:big_model", "kwargs": {"numel": numel}},
            "sampler": {"target": "benchmarks.evaluators:sample", "nfe": 1},
            "fid": {"features": {"target": "benchmarks.evaluators:features"}},
            "evaluators": {"num_actors": 2, "num_cpus": 0.5, "batch_size": 100},
        }
    )
    layout = Layout(["w"], [(numel,)], ["float32"], [0], numel)
    rng = np.random.default_rng(0)
    refs = [ray.put(rng.standard_normal(numel, dtype=np.float32) * 0.01) for _ in range(k)]
    cset = CheckpointSet(
        [f"mem{i}" for i in range(k)],
        [f"c{i}" for i in range(k)],
        list(range(k)),
        layout,
        refs,
        None,
        layout.nbytes * k,
    )
    reference = (np.zeros(16), np.eye(16))
    rows = []
    for mode, cls in (("zero-copy", MeasuredEvaluator), ("copying baseline", CopyingEvaluator)):
        remote = ray.remote(cls).options(num_cpus=0.5)
        actors = [remote.remote(spec, cset.refs, layout, reference[0], reference[1]) for _ in range(2)]
        ray.get([a.evaluate.remote([1.0 / k] * k, 200, 0) for a in actors])
        for index, growth in enumerate(ray.get([a.growth.remote() for a in actors])):
            rows.append({"mode": mode, "actor": index + 1, "set_bytes": cset.nbytes, **growth})
        for actor in actors:
            ray.kill(actor)
        time.sleep(1.0)
    return rows


def frechet_rows(dim: int, repeats: int) -> list[dict]:
    """Time our eigh-based distance against scipy.linalg.sqrtm on the same covariances."""
    import scipy.linalg

    from lcsc_ray.fid import frechet_distance

    rng = np.random.default_rng(0)
    x = rng.standard_normal((dim * 2, dim)) @ (rng.standard_normal((dim, dim)) / np.sqrt(dim))
    y = x[: dim * 2] * 1.05 + 0.01 * rng.standard_normal((dim * 2, dim))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)

    def scipy_fid() -> float:
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        diff = mu1 - mu2
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    rows = []
    for name, fn in (("eigh (ours)", lambda: frechet_distance(mu1, s1, mu2, s2)), ("scipy sqrtm", scipy_fid)):
        times, value = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - start)
        rows.append({"method": name, "dim": dim, "seconds": min(times), "fid": value})
    rows[0]["speedup_vs_sqrtm"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[0]["relative_difference"] = abs(rows[0]["fid"] - rows[1]["fid"]) / abs(rows[1]["fid"])
    return rows


def print_throughput(rows: list[dict]) -> None:
    """The evaluations/s table."""
    print(f"{'evaluators':>10s} {'device':>6s} {'jobs':>5s} {'samples':>7s} {'eval/s':>8s} {'x vs 1':>7s}")
    for r in rows:
        print(
            f"{r['evaluators']:10d} {r['device']:>6s} {r['jobs']:5d} {r['samples']:7d} "
            f"{r['evaluations_per_s']:8.3f} {r['speedup_vs_1']:7.2f}"
        )


def main() -> None:
    """Run the comparisons and write benchmarks/results/evaluators.json (evaluators_throughput.json with
    --throughput-only)."""
    import tempfile

    cli = harness.parser(__doc__, seeds=[0], quick_seeds=[0])
    cli.add_argument("--throughput-only", action="store_true", help="only evaluations/s against evaluators")
    cli.add_argument(
        "--counts", type=int, nargs="+", default=None, help="evaluator counts (default 1..cores)"
    )
    cli.add_argument("--gpu", action="store_true", help="evaluators share one GPU (1/n each)")
    args = cli.parse_args()
    torch.set_num_threads(1)
    started = time.monotonic()
    k, numel, dim, repeats = (4, 5_000_000, 512, 2) if args.quick else (8, 12_500_000, 2048, 2)
    jobs, samples = (6 if args.quick else 16), 100
    cores = os.cpu_count() or 1
    counts = args.counts or list(range(1, min(cores, 4) + 1))
    ray_spec = RaySpec(num_cpus=max(cores, max(counts)), object_store_memory=2 * k * numel * 4)
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}}
    record = harness.run_record(args)
    with ray_session(ray_spec, runtime_env=runtime_env), tempfile.TemporaryDirectory() as tmp:
        run = write_diffusers_run(Path(tmp) / "run")
        sweep = harness.Sweep(
            "evaluators_throughput" if args.throughput_only else "evaluators",
            configs={f"{n} evaluators": n for n in counts},
            seeds=harness.chosen_seeds(args),
            measure=lambda _name, n, _seed: throughput(n, args.gpu, jobs, samples, run, Path(tmp) / "out"),
            describe=(
                f"{jobs} evaluations of {samples} DDIM-10 samples of a small diffusers UNet per row, dispatched by "
                "the evaluator pool, against the number of evaluators"
            ),
        )
        rows = speedups(
            harness.run_sweep(sweep, harness.results_dir(args), fresh=True)
        )  # timings: never reused
        memory = [] if args.throughput_only else memory_rows(k, numel)
    print_throughput(rows)
    sweep.extra.update(
        throughput=rows, load_average=os.getloadavg()[0], wall_time_s=time.monotonic() - started
    )
    if not args.throughput_only:
        sweep.extra.update(memory_report(memory, frechet_rows(dim, repeats)))
    harness.finish(sweep, args, record, rows)


def memory_report(memory: list[dict], frechet: list[dict]) -> dict:
    """Print the memory and Frechet tables; their part of the JSON result."""
    mib = 2**20
    print(
        f"checkpoint set: {memory[0]['set_bytes'] / mib:.0f} MiB; growth from "
        "before construction to after one evaluation"
    )
    print(f"{'mode':18s} {'actor':>5s} {'RSS +MiB':>9s} {'USS +MiB':>9s} {'PSS +MiB':>9s} {'USS+/set':>9s}")
    for r in memory:
        print(
            f"{r['mode']:18s} {r['actor']:5d} {r['rss_growth'] / mib:9.0f} {r['uss_growth'] / mib:9.0f} "
            f"{r['pss_growth'] / mib:9.0f} {r['uss_growth'] / r['set_bytes']:9.3f}"
        )
    print(f"\n{'method':12s} {'dim':>5s} {'seconds':>8s} {'FID':>14s}")
    for r in frechet:
        print(f"{r['method']:12s} {r['dim']:5d} {r['seconds']:8.3f} {r['fid']:14.6f}")
    print(
        f"eigh is {frechet[0]['speedup_vs_sqrtm']:.1f}x faster; relative difference "
        f"{frechet[0]['relative_difference']:.1e} (target < 1e-6)"
    )
    extra = next(r for r in memory if r["mode"] == "zero-copy" and r["actor"] == 2)
    ratio = extra["uss_growth"] / extra["set_bytes"]
    print(f"extra zero-copy actor: USS +{ratio:.3f} x set (target < 0.2)")
    return {"memory": memory, "frechet": frechet, "extra_actor_uss_over_set": ratio, "target_over_set": 0.2}


if __name__ == "__main__":
    main()
