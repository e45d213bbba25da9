"""Pipeline benchmark: stage-actor throughput vs single process, strategy overheads, recovery times, norm scope.

`python benchmarks/pipeline.py [--quick]` prints a table and writes benchmarks/results/pipeline.json
with the machine's description. Ratios, not absolute times, are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)

import ray
import torch

from checkfree_ray.data import ByteCorpus
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.recovery import gradient_weights
from schemas.train import TrainSpec

RESULTS = Path(__file__).parent / "results" / "pipeline.json"


def make_spec(size: dict, strategy: str, **extra) -> TrainSpec:
    data = {"model": size["model"], "optim": {"lr": 1e-3},
            "pipeline": {**size["pipeline"], "num_cpus_per_stage": 0.4}, "recovery": {"strategy": strategy}}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainSpec.model_validate(data)


def single_process_tokens_per_s(spec: TrainSpec, steps: int) -> float:
    torch.set_num_threads(1)
    trainer = ReferenceTrainer(ModelConfig.from_spec(spec.model, spec.pipeline.num_stages), spec.seed, spec.optim.lr)
    corpus = ByteCorpus(spec.data, spec.model.seq_len, spec.seed)
    order = list(range(spec.pipeline.num_stages))
    pipe = spec.pipeline
    trainer.train_step(*corpus.train_batch(0, pipe.micro_batches, pipe.micro_batch_size), [order] * pipe.micro_batches)
    times = []
    for step in range(1, steps + 1):
        batch = corpus.train_batch(step, pipe.micro_batches, pipe.micro_batch_size)
        start = time.perf_counter()
        trainer.train_step(*batch, [order] * pipe.micro_batches)
        times.append(time.perf_counter() - start)
    return pipe.micro_batches * pipe.micro_batch_size * spec.model.seq_len / statistics.median(times)


def run_executor(spec: TrainSpec, steps: int, checkpoint_uri: str | None = None) -> PipelineExecutor:
    executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
    executor.start()
    try:
        step = 1
        while step <= steps:
            step = executor.run_step(step)
    finally:
        executor.shutdown()
    return executor


def pipeline_tokens_per_s(executor: PipelineExecutor) -> float:
    pipe, spec = executor.spec.pipeline, executor.spec
    step_s = statistics.median(executor.history.step_times[1:])
    return pipe.micro_batches * pipe.micro_batch_size * spec.model.seq_len / step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="A smaller model and fewer steps.")
    args = parser.parse_args()
    if args.quick:
        size = {"model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64},
                "pipeline": {"num_stages": 4, "micro_batches": 4, "micro_batch_size": 8}}
        steps = 12
    else:
        size = {"model": {"d_model": 128, "n_layers": 8, "n_heads": 4, "seq_len": 128},
                "pipeline": {"num_stages": 4, "micro_batches": 4, "micro_batch_size": 16}}
        steps = 20
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    rows, out = [], {"size": size, "steps": steps}

    single = single_process_tokens_per_s(make_spec(size, "none"), steps)
    runs = {s: run_executor(make_spec(size, s), steps) for s in ("none", "checkfree", "checkfree+")}
    tps = {s: pipeline_tokens_per_s(e) for s, e in runs.items()}
    out["throughput"] = {"single_process_tokens_per_s": single, **{f"{s}_tokens_per_s": v for s, v in tps.items()}}
    rows.append(("pipeline(none) / single process tokens/s", tps["none"] / single))
    for s in ("checkfree", "checkfree+"):
        rows.append((f"step-time overhead {s} vs none", tps["none"] / tps[s] - 1.0))

    # Recovery vs checkpoint restore in one run: middle-stage kills (CheckFree), then an adjacent pair (rollback).
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"cf-bench-{os.getpid()}"
    recover_steps = 12
    schedule = [[3, 1], [5, 2], [7, 1], [9, 1], [9, 2]]
    recoveries = {}
    for warm in (True, False):
        spec = make_spec(size, "checkfree", pipeline={"warm_standby": warm}, checkpointing={"every": 4},
                         failures={"schedule": schedule})
        executor = run_executor(spec, recover_steps, checkpoint_uri=str(tmp / f"ckpt-{warm}"))
        fails = executor.history.failures
        cf = [f.death_to_retry_s for f in fails if f.strategy == "checkfree"]
        ck = [f.death_to_retry_s for f in fails if f.strategy == "checkpoint"]
        label = "warm" if warm else "cold"
        recoveries[label] = {"checkfree_death_to_retry_s": cf, "checkpoint_death_to_retry_s": ck,
                             "detection_s": [f.detection_s for f in fails]}
        rows.append((f"median CheckFree recovery s ({label} standby)", statistics.median(cf)))
        rows.append((f"checkpoint restore s ({label} standby)", statistics.median(ck)))
    rows.append(("median detection s", statistics.median(recoveries["warm"]["detection_s"])))
    out["recovery"] = recoveries

    # Gradient-norm scope: weight of the last stage when stage S-2 is rebuilt, and the loss just after.
    S = size["pipeline"]["num_stages"]
    base = run_executor(make_spec(size, "none"), 10).history.losses
    scope_rows = {}
    for scope in ("blocks", "stage"):
        spec = make_spec(size, "checkfree", recovery={"grad_norm_scope": scope},
                         failures={"schedule": [[8, S - 2]]})
        weights: list = []
        executor = PipelineExecutor(spec)
        def record_weights(ex, step, weights=weights, scope=scope):
            if step == 8:
                weights.append(gradient_weights(ex.grad_norms[S - 3][scope], ex.grad_norms[S - 1][scope], 1e-4))

        executor.before_step.append(record_weights)
        executor.start()
        try:
            step = 1
            while step <= 10:
                step = executor.run_step(step)
        finally:
            executor.shutdown()
        delta = [a - b for a, b in zip(executor.history.losses[7:], base[7:])]
        scope_rows[scope] = {"weight_on_last_stage": weights[0][1], "loss_excess_steps_8_10": delta}
        rows.append((f"scope={scope}: weight on last stage", weights[0][1]))
        rows.append((f"scope={scope}: loss excess at retried step 8", delta[0]))
    out["grad_norm_scope"] = scope_rows
    ray.shutdown()

    out["machine"] = {"cpus": os.cpu_count(), "torch_threads_per_actor": 1, "python": sys.version.split()[0],
                      "torch": torch.__version__, "ray": ray.__version__, "platform": platform.platform(),
                      "quick": args.quick, "note": "2 shared cores; other work ran concurrently"}
    out["table"] = {name: value for name, value in rows}
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.4g}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
