"""Pipeline benchmark: stage-actor throughput vs single process (GPipe and 1F1B), strategy overheads, recovery
times, norm scope, and the step-time stall of saving a checkpoint every 20 steps (stages write their shards in
the background, vs every shard through the driver while the step waits).

Every system trains on the path users run: a token file written by `checkfree_ray.tokenizing.tokenize` (the
built-in text, byte-level) read by the token-file loader, under the cosine learning-rate schedule; the
single-process baseline reads the same batches and follows the same schedule.

`python benchmarks/pipeline.py [--quick] [--seeds 0 1 2] [--sections throughput,save]` prints a table and writes
benchmarks/results/pipeline.json (--quick: outputs/bench/quick/) with the machine's description; the throughput
comparison is a harness sweep of systems x rounds (the seeds). Ratios, not absolute times, are what to quote.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from checkfree_ray.data import load_text_bytes, make_corpus
from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.lr_schedule import lr_factor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.recovery_rules import gradient_weights
from checkfree_ray.tokenizing import tokenize
from rayops.paired import paired_difference
from schemas.train import PipelineSpec, TrainSpec


def make_spec(size: dict, strategy: str, **extra) -> TrainSpec:
    data = {
        "model": size["model"],
        "optim": {"lr": 1e-3, **size.get("optim", {})},
        "data": size.get("data", {}),
        "pipeline": {**size["pipeline"], "num_cpus_per_stage": 0.4},
        "recovery": {"strategy": strategy},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainSpec.model_validate(data)


def tokens_per_step(spec: TrainSpec) -> int:
    pipe = spec.pipeline
    return pipe.micro_batches * pipe.micro_batch_size * spec.model.seq_len


def run_executor(
    spec: TrainSpec, steps: int, checkpoint_uri: str | None = None, ready_standbys: bool = False
) -> PipelineExecutor:
    executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
    executor.start()
    if ready_standbys and hasattr(executor.pool, "wait_standbys"):
        executor.pool.wait_standbys()  # a failure long after start finds them up
    try:
        step = 1
        while step <= steps:
            step = executor.run_step(step)
    finally:
        executor.shutdown()
    return executor


class SingleProcess:
    """Single-process training of the same model with `threads` torch threads, stepped in blocks."""

    def __init__(self, spec: TrainSpec, threads: int = 1):
        self.threads = threads
        self.spec, pipe = spec, spec.pipeline
        self.trainer = ReferenceTrainer(ModelConfig.from_train_spec(spec), spec.seed, spec.optim.lr)
        self.corpus = make_corpus(spec.data, spec.model.seq_len, spec.seed)  # the executor's loader
        self.orders = [list(range(pipe.num_stages))] * pipe.micro_batches
        self.step = 0

    def block(self, steps: int) -> list[float]:
        times, pipe = [], self.spec.pipeline
        torch.set_num_threads(self.threads)
        for _ in range(steps):
            self.step += 1
            batch = self.corpus.train_batch(self.step, pipe.micro_batches, pipe.micro_batch_size)
            start = time.perf_counter()
            self.trainer.train_step(*batch, self.orders, lr_factor=lr_factor(self.spec, self.step))
            times.append(time.perf_counter() - start)
        return times


class Pipeline:
    """A started executor, stepped in blocks (`blocking`: checkpoints saved through the driver while it waits)."""

    def __init__(self, spec: TrainSpec, checkpoint_uri: str | None = None, blocking: bool = False):
        self.executor = PipelineExecutor(spec, checkpoint_uri=checkpoint_uri)
        if blocking:
            self.executor._save_checkpoint = self._blocking_save
        self.executor.start()
        self.step = 1

    def _blocking_save(self, step: int) -> None:
        """The previous design: every stage's shard comes to the driver, which writes them all, then the manifest."""
        ex = self.executor
        if step % ex.spec.checkpoint_every():
            return
        shards = ray.get([a.state_bytes.remote() for a in ex.actors], timeout=600)
        ex.checkpoints.save(step, shards, {"grad_norms": ex.grad_norms})

    def block(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step = self.executor.run_step(self.step)
            times.append(time.perf_counter() - start)
        return times


def throughput_systems(size: dict) -> dict:
    """The single process (1 and 2 torch threads) and the pipelines, each warmed up: "none" is GPipe, "none-1f1b"
    the same under 1F1B."""
    standby_off = {"pipeline": {"warm_standby": False, "num_cpus_per_stage": 0.1}}
    one_f_one_b = {"pipeline": {"warm_standby": False, "num_cpus_per_stage": 0.1, "schedule": "1f1b"}}
    # "single" runs one torch thread, as each stage does; "single-2t" may use both cores, the stricter baseline
    systems = {
        "single": SingleProcess(make_spec(size, "none")),
        "single-2t": SingleProcess(make_spec(size, "none"), threads=2),
        "none-1f1b": Pipeline(make_spec(size, "none", **one_f_one_b)),
        **{s: Pipeline(make_spec(size, s, **standby_off)) for s in ("none", "checkfree", "checkfree+")},
    }
    for system in systems.values():
        system.block(2)  # warm-up
    return systems


def paired_throughput(size: dict, args, block_steps: int) -> tuple[dict, list[dict], harness.Sweep]:
    """Single process and the pipelines, alternated in blocks (a harness sweep: systems x rounds, the order
    reversed every round, so load from other work on the machine hits both sides of each ratio about equally);
    ratios per round, their medians and a 95% interval, the sweep's rows and the sweep."""
    systems = throughput_systems(size)
    sweep = harness.Sweep(
        "pipeline",
        configs={name: name for name in systems},
        seeds=harness.chosen_seeds(args),
        measure=lambda name, _name, _round: {"step_s": statistics.median(systems[name].block(block_steps))},
        alternate=True,
    )
    try:
        rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # timings are never reused
    finally:
        for system in systems.values():
            if isinstance(system, Pipeline):
                system.executor.shutdown()
    per_round = {
        name: [r["step_s"] for r in sorted(rows, key=lambda r: r["seed"]) if r["config"] == name]
        for name in systems
    }
    step_s = {name: statistics.median(v) for name, v in per_round.items()}
    # tokens/s ratio pipeline / single = single step time / pipeline step time, per round (same tokens per step)
    ratios = {
        f"{pipe}_over_{single}": [a / b for a, b in zip(per_round[single], per_round[pipe])]
        for pipe in ("none", "none-1f1b")
        for single in ("single", "single-2t")
    }
    ratios["none-1f1b_over_none"] = [a / b for a, b in zip(per_round["none"], per_round["none-1f1b"])]
    overhead = {
        s: [t / none - 1.0 for t, none in zip(per_round[s], per_round["none"])]
        for s in ("checkfree", "checkfree+")
    }
    tokens = tokens_per_step(make_spec(size, "none"))
    return (
        {
            "rounds": len(sweep.seeds),
            "block_steps": block_steps,
            "step_s_per_round": per_round,
            "tokens_per_s": {name: tokens / t for name, t in step_s.items()},
            "ratios_per_round": ratios,
            "ratios_median": {k: statistics.median(v) for k, v in ratios.items()},
            "ratios_mean_ci95": {k: _interval(v) for k, v in ratios.items()},
            "pipeline_over_single_median": statistics.median(ratios["none_over_single"]),
            "pipeline_over_single_2threads_median": statistics.median(ratios["none_over_single-2t"]),
            "overhead_vs_none_per_round": overhead,
            "overhead_vs_none_median": {s: statistics.median(v) for s, v in overhead.items()},
        },
        rows,
        sweep,
    )


def _interval(ratios: list[float]) -> list[float]:
    """[mean, low, high] of per-round ratios: the paired interval of ratio - 1 over rounds (`rayops.paired`)."""
    diff = paired_difference(ratios, [1.0] * len(ratios))
    return [1.0 + diff.mean, 1.0 + diff.low, 1.0 + diff.high]


def token_file(tmp: Path, source: str = "python-docs") -> str:
    """The built-in text written once as a byte-level token artifact (what `checkfree-ray tokenize` writes)."""
    text = tmp / f"{source}.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_bytes(load_text_bytes(source))
    out = tmp / "tokens"
    tokenize([str(text)], str(out), val_fraction=0.05, progress=False)
    return str(out)


def save_stall(size: dict, tmp: Path, rounds: int, every: int = 20) -> dict:
    """Mean step time over blocks of `every` steps (one save each) with background saves, with blocking saves, and
    without checkpoints; alternated in paired rounds like the throughput comparison. Stall = time / none - 1."""
    off = {"pipeline": {"warm_standby": False, "num_cpus_per_stage": 0.1}}
    saving = make_spec(size, "checkfree", checkpointing={"every": every, "keep": 1}, **off)
    systems = {
        "none": Pipeline(make_spec(size, "checkfree", **off)),
        "background": Pipeline(saving, checkpoint_uri=str(tmp / "background")),
        "blocking": Pipeline(saving, checkpoint_uri=str(tmp / "blocking"), blocking=True),
    }
    names = list(systems)
    per_round = {name: [] for name in names}
    # within a block: (sum of step times - every x the block's median step) / (every x median); the median step
    # has no save, so this is the save's share per step, measured against the same minute's load ("none": noise)
    within = {name: [] for name in names}
    try:
        for system in systems.values():
            system.block(2)  # warm-up; each later block of `every` steps holds exactly one save
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times = systems[name].block(every)
                per_round[name].append(statistics.mean(times))
                median = statistics.median(times)
                within[name].append((sum(times) - every * median) / (every * median))
        saves = systems["background"].executor.history.costs.get("checkpoint_saves", 0.0)
        bytes_saved = systems["background"].executor.history.costs.get("checkpoint_bytes", 0.0)
    finally:
        for system in systems.values():
            system.executor.shutdown()
    stall = {
        name: [t / none - 1.0 for t, none in zip(per_round[name], per_round["none"])]
        for name in ("background", "blocking")
    }
    return {
        "every": every,
        "rounds": rounds,
        "mean_step_s_per_round": per_round,
        "stall_per_step_per_round": stall,
        "stall_per_step_median": {k: statistics.median(v) for k, v in stall.items()},
        "within_block_excess_per_round": within,
        "within_block_excess_median": {k: statistics.median(v) for k, v in within.items()},
        "background_saves_completed": saves,
        "checkpoint_bytes": bytes_saved,
    }


def recovery_times(size: dict, tmp: Path) -> dict:
    """CheckFree recoveries (middle-stage kills) and a checkpoint restore (an adjacent pair), warm and cold."""
    recover_steps = 12
    schedule = [[3, 1], [5, 2], [7, 1], [9, 1], [9, 2]]
    standbys = 3
    recoveries = {}
    for warm in (True, False):
        pipeline = {"warm_standby": warm, "num_cpus_per_stage": 0.25}
        if warm and "standby_actors" in PipelineSpec.model_fields:
            pipeline["standby_actors"] = standbys
        spec = make_spec(
            size, "checkfree", pipeline=pipeline, checkpointing={"every": 4}, failures={"schedule": schedule}
        )
        executor = run_executor(
            spec, recover_steps, checkpoint_uri=str(tmp / f"ckpt-{warm}"), ready_standbys=warm
        )
        fails = executor.history.failures
        cf = [f.death_to_retry_s for f in fails if f.method == "checkfree"]
        ck = [f.death_to_retry_s for f in fails if f.method == "checkpoint"]
        recoveries["warm" if warm else "cold"] = {
            "standby_actors": pipeline.get("standby_actors", int(warm)),
            "checkfree_death_to_retry_s": cf,
            "checkpoint_death_to_retry_s": ck,
            "detection_s": [f.detection_s for f in fails],
            "from_standby": [f.warm_standby for f in fails],
            "phases_after_detection_s": getattr(executor.history, "recovery_phases", []),
            "checkfree_median_s": statistics.median(cf),
            "checkpoint_median_s": statistics.median(ck),
        }
    return recoveries


def main() -> None:
    cli = harness.parser(__doc__, seeds=range(5), quick_seeds=range(7))  # seeds: the paired throughput rounds
    cli.add_argument(
        "--sections",
        default="throughput,recovery,scope,save",
        help="Comma-separated parts to run: throughput, recovery, scope, save.",
    )
    args = cli.parse_args()
    sections = set(args.sections.split(","))
    if args.quick:
        size = {
            "model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64},
            "pipeline": {"num_stages": 4, "micro_batches": 4, "micro_batch_size": 8},
        }
        block_steps = 6
    else:
        size = {
            "model": {"d_model": 128, "n_layers": 8, "n_heads": 4, "seq_len": 128},
            "pipeline": {"num_stages": 4, "micro_batches": 4, "micro_batch_size": 16},
        }
        block_steps = 3
    size["data"] = {
        "tokens_uri": token_file(Path(os.environ.get("TMPDIR", "/tmp")) / f"cf-bench-tok-{os.getpid()}")
    }
    size["optim"] = {"schedule": "cosine", "warmup_steps": 5, "decay_steps": 500, "min_lr": 1e-4}
    rounds = len(harness.chosen_seeds(args))
    record = harness.run_record(
        args,
        torch_threads_per_actor=1,
        single_process_torch_threads=[1, 2],
        note="2 shared cores; compare ratios measured in one run",
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    rows, out = [], {"size": size, "load_average_at_start": list(os.getloadavg())}
    sweep_rows: list[dict] = []
    sweep = harness.Sweep("pipeline", configs={}, seeds=harness.chosen_seeds(args), measure=lambda *_: {})

    if "throughput" in sections:
        tp, sweep_rows, sweep = paired_throughput(size, args, block_steps)
        out["throughput"] = tp
        for pipe, label in (("none", "GPipe"), ("none-1f1b", "1F1B")):
            for single, threads in (("single", 1), ("single-2t", 2)):
                mean, low, high = tp["ratios_mean_ci95"][f"{pipe}_over_{single}"]
                rows.append(
                    (
                        f"pipeline {label} / single process tokens/s ({threads} thread(s); paired median)",
                        tp["ratios_median"][f"{pipe}_over_{single}"],
                    )
                )
                rows.append((f"  same, mean of rounds [95% interval {low:.3f}, {high:.3f}]", mean))
        rows.append(("1F1B / GPipe tokens/s (paired median)", tp["ratios_median"]["none-1f1b_over_none"]))
        for s in ("checkfree", "checkfree+"):
            rows.append(
                (
                    f"step-time overhead {s} vs none (median of paired rounds)",
                    tp["overhead_vs_none_median"][s],
                )
            )

    if "recovery" in sections:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"cf-bench-{os.getpid()}"
        recoveries = recovery_times(size, tmp)
        for label in ("warm", "cold"):
            rows.append(
                (f"median CheckFree death-to-retry s ({label})", recoveries[label]["checkfree_median_s"])
            )
            rows.append(
                (
                    f"median checkpoint restore death-to-retry s ({label})",
                    recoveries[label]["checkpoint_median_s"],
                )
            )
        rows.append(("median detection s", statistics.median(recoveries["warm"]["detection_s"])))
        out["recovery"] = recoveries

    if "scope" in sections:
        rows.extend(norm_scope(size, out))

    if "save" in sections:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"cf-bench-save-{os.getpid()}"
        stall = save_stall(size, tmp, rounds=max(3, rounds // 2))
        out["save_stall"] = stall
        for name in ("background", "blocking"):
            rows.append(
                (
                    f"checkpoint every 20 steps: step-time stall, {name} save (median of paired rounds)",
                    stall["stall_per_step_median"][name],
                )
            )
        for name in ("none", "background", "blocking"):
            rows.append(
                (
                    f"checkpoint every 20 steps: block time over its median step - 1, {name} save",
                    stall["within_block_excess_median"][name],
                )
            )
    ray.shutdown()

    out["table"] = {name: value for name, value in rows}
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.4g}")
    sweep = dataclasses.replace(
        sweep,
        describe=(
            "throughput rows: the median step seconds of a block of steps per system and round (= seed), the "
            "systems alternated; recovery, norm scope and save stall as their own sections"
        ),
        extra=out,
    )
    paired = (
        [harness.paired_table(sweep_rows, "step_s", baseline="none", better="lower")] if sweep_rows else []
    )
    harness.finish(sweep, args, record, sweep_rows, paired=paired, title="Pipeline benchmark")


def norm_scope(size: dict, out: dict) -> list:
    """Gradient-norm scope: weight of the last stage when stage S-2 is rebuilt, and the loss just after."""
    rows = []
    S = size["pipeline"]["num_stages"]
    base = run_executor(make_spec(size, "none"), 10).history.losses
    scope_rows = {}
    for scope in ("blocks", "stage"):
        spec = make_spec(
            size, "checkfree", recovery={"grad_norm_scope": scope}, failures={"schedule": [[8, S - 2]]}
        )
        weights: list = []
        executor = PipelineExecutor(spec)

        def record_weights(ex, step, weights=weights, scope=scope):
            if step == 8:
                weights.append(
                    gradient_weights(ex.grad_norms[S - 3][scope], ex.grad_norms[S - 1][scope], 1e-4)
                )

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
    return rows


if __name__ == "__main__":
    main()
