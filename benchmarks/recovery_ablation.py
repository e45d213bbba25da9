"""CheckFree's recovery ablation (paper Figure 2) from a trained model: how well does each rule rebuild a lost stage?

`python benchmarks/recovery_ablation.py [--quick] [--scales small large] [--train-only]`

1. Trains each scale's model to a plateau once (a constant learning rate; cached as the engine's own checkpoint
   under outputs/bench-cache/recovery/, keyed by the spec's fingerprint; `recovery_inprocess.py`).
2. For each seed, continues training from the plateau on that seed's data stream; after a delay drawn from the
   seed's failure stream, a stage is lost and rebuilt by each rule: weighted (CheckFree), average, copy, random,
   identity (the stage becomes an exact skip) and exact (its own same-step weights: the upper bound), at two middle
   positions, with `recovery.lr_scale` 1.1 and 1.0; plus an outer stage under CheckFree+ rebuilt by copying its
   swap partner (from a model trained under CheckFree+). The no-failure twin continues the same snapshot.
3. Measures (a) the validation loss right after the rebuild, before any step, (b) steps until the validation loss
   is back within 1% of the twin's, (c) the loss at the end, each as a paired difference against the twin with a
   95% interval over seeds (`rayops/paired.py`), and weighted against the other rules.
4. Writes benchmarks/results/recovery_ablation.json, .png and .md (the .md is generated from the measured values).

The stages are the engine's `StageWorker`s driven in one process (the same model, optimizer, clipping, norms and
`recovery_rules.py` rules; no Ray transport): see recovery_inprocess.py. Each (seed, lr_scale, stage) can run in
its own process (`--seeds 0 --lr-scales 1.1 --stages 1`); `--report-only` merges what was measured.

Runtime measured here (2 shared cores, load average 50-110): training the small model to step 2000 took about
35 min, the deep one to step 750 about 13 min, the CheckFree+ one to step 750 about 25 min (each once; cached);
the ablation itself, one process per (seed, lr scale, stage), about 6 min for the small scale (12 processes),
7 min for the deep one (3). --quick trains a 300-step model and measures one stage with 2 seeds (not timed under
this load).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, machine_info, write_json
from recovery_ablation_report import notes, plot, summarise, table_text
from recovery_inprocess import CACHE, LocalPipeline, trained_pipeline

from checkfree_ray.data import FAILURE_STREAM, make_corpus, step_rng
from schemas.train import TrainSpec

RULES = ["weighted", "average", "copy", "random", "identity", "exact"]
SCALES = {  # model and pipeline of each scale; steps to the plateau (CheckFree, CheckFree+); steps measured after
    "small": {
        "model": {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64},
        "steps": 3000,
        "steps_plus": 1000,
        "start": 2000,
        "start_plus": 750,
        "after": 30,
        "stages": [1, 2],
    },
    # 2 blocks per stage at the same width: what fitted beside the small scale on the shared cores (load 15-40)
    "deep": {
        "model": {"d_model": 64, "n_layers": 8, "n_heads": 4, "seq_len": 64},
        "steps": 800,
        "start": 750,
        "after": 30,
        "stages": [1],
    },
}
QUICK = {"small": {"model": SCALES["small"]["model"], "steps": 300, "after": 20, "stages": [1]}}
PIPELINE = {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 8}
EVAL_BATCHES = 8  # validation micro-batches of 8 sequences, the same set at every evaluation
WITHIN = 0.01  # "recovered": validation loss within 1% of the twin's


def plateau_spec(scale: dict, strategy: str, lr_scale: float = 1.1) -> TrainSpec:
    """The training spec of one scale's plateau model (and of the runs continued from it)."""
    return TrainSpec.model_validate(
        {
            "name": f"recovery-ablation-{scale['model']['d_model']}x{scale['model']['n_layers']}-{strategy}",
            "seed": 0,
            "steps": scale["steps_plus" if strategy == "checkfree+" else "steps"],
            "model": scale["model"],
            "pipeline": PIPELINE,
            "optim": {"lr": 3e-3},
            "recovery": {"strategy": strategy, "lr_scale": lr_scale},
        }
    )


def validation_set(spec: TrainSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation micro-batches of the plateau run."""
    return make_corpus(spec.data, spec.model.seq_len, spec.seed).val_batches(
        EVAL_BATCHES, spec.pipeline.micro_batch_size
    )


def eval_offsets(after: int) -> list[int]:
    """Steps after the rebuild at which the loss is measured: dense early (recovery is fast), sparser later."""
    dense = [0, 1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 60, 75, 90, 105, 120, 135, 150]
    return sorted({k for k in dense if k <= after} | {after})


def failure_delay(seed: int) -> int:
    """Steps after the plateau before the stage is lost: the seed's failure stream (1..20)."""
    return int(step_rng(seed, FAILURE_STREAM, 0).integers(1, 21))


def continue_run(
    pipeline: LocalPipeline,
    corpus,
    start_step: int,
    offsets: list[int],
    val: tuple[torch.Tensor, torch.Tensor],
) -> list[float]:
    """Validation loss at each of `offsets` steps after `start_step` (offset 0: before any step)."""
    losses, done = [], 0
    for offset in offsets:
        while done < offset:
            done += 1
            pipeline.train_step(start_step + done, corpus)
        losses.append(pipeline.evaluate(*val))
    return losses


def recovered_after(offsets: list[int], losses: list[float], twin: list[float]) -> int | None:
    """First measured offset from which the loss stays within `WITHIN` of the twin's; None if it never does."""
    for i in range(len(offsets)):
        if all(a <= b * (1 + WITHIN) for a, b in zip(losses[i:], twin[i:])):
            return offsets[i]
    return None


def with_recovery(spec: TrainSpec, **changes) -> TrainSpec:
    """`spec` with fields of its `recovery` section changed (lr_scale, grad_norm, grad_norm_scope)."""
    return spec.model_copy(update={"recovery": spec.recovery.model_copy(update=changes)})


def measure_seed(
    pipeline: LocalPipeline,
    plateau,
    spec: TrainSpec,
    start: int,
    seed: int,
    cases: list[dict],
    after: int,
    val,
    log,
    on_run=None,
) -> dict:
    """One seed: continue the plateau on the seed's data, lose a stage after the seed's delay, and measure the
    twin and every case ({stage, rule, lr_scale, variant}) from the same snapshot; `on_run` sees what is measured
    so far before each case (a long run keeps its partial results)."""
    corpus = make_corpus(spec.data, spec.model.seq_len, seed)
    pipeline.spec = spec
    pipeline.restore(plateau)
    fail_step = start + failure_delay(seed)
    for step in range(start + 1, fail_step):
        pipeline.train_step(step, corpus)
    before = pipeline.snapshot()
    offsets = eval_offsets(after)
    twin = continue_run(pipeline, corpus, fail_step - 1, offsets, val)
    runs = []
    for case in cases:
        if on_run is not None:
            on_run({"seed": seed, "fail_step": fail_step, "offsets": offsets, "twin": twin, "runs": runs})
        pipeline.restore(before)
        variant = {k: v for k, v in case.get("variant", {}).items()}
        pipeline.spec = with_recovery(spec, lr_scale=case["lr_scale"], **variant)
        recipe = pipeline.rebuild(case["stage"], case["rule"], fail_step, seed)
        losses = continue_run(pipeline, corpus, fail_step - 1, offsets, val)
        runs.append(
            {
                **case,
                "recipe": recipe,
                "losses": losses,
                "recovered_after": recovered_after(offsets, losses, twin),
            }
        )
        log(
            f"    seed {seed} stage {case['stage']} {case['name']:<18} lr x{case['lr_scale']}: "
            f"after rebuild {losses[0] - twin[0]:+.4f}, end {losses[-1] - twin[-1]:+.4f}"
        )
    pipeline.spec = spec
    return {"seed": seed, "fail_step": fail_step, "offsets": offsets, "twin": twin, "runs": runs}


def cases_for(strategy: str, stages: list[int], lr_scales: list[float], variants: bool) -> list[dict]:
    """What is rebuilt in each seed: every rule at every middle position and lr_scale (CheckFree), or the outer
    stages by copy and exact (CheckFree+); with `variants`, the weighted rule under the other weighing norms."""
    if strategy == "checkfree+":
        return [
            {"name": rule, "rule": rule, "stage": s, "lr_scale": 1.1}
            for s in stages
            for rule in ("copy", "exact")
        ]
    cases = [
        {"name": rule, "rule": rule, "stage": s, "lr_scale": lr}
        for lr in lr_scales
        for s in stages
        for rule in RULES
    ]
    if variants:
        for name, variant in (
            ("weighted/pre_clip", {"grad_norm": "pre_clip"}),
            ("weighted/blocks", {"grad_norm_scope": "blocks"}),
        ):
            cases += [
                {"name": name, "rule": "weighted", "stage": s, "lr_scale": 1.1, "variant": variant}
                for s in stages
            ]
    return cases


def measure_scale(
    name: str,
    scale: dict,
    strategy: str,
    seeds: list[int],
    stages: list[int],
    lr_scales: list[float],
    variants: bool,
    log,
    save=None,
) -> dict:
    """Every seed of one scale and strategy, from its cached trained model; `save` receives partial results."""
    spec = plateau_spec(scale, strategy)
    val = validation_set(spec)
    start = scale.get("start" if strategy == "checkfree" else "start_plus", spec.steps)
    log(f"{name} / {strategy}: trained model at step {start} of its run's {spec.steps}")
    pipeline, history = trained_pipeline(spec, val, until=start, log=log)
    plateau = pipeline.snapshot()
    cases = cases_for(strategy, stages, lr_scales, variants)
    started = time.monotonic()

    def result(per_seed: list[dict]) -> dict:
        return {
            "scale": name,
            "strategy": strategy,
            "model": scale["model"],
            "pipeline": PIPELINE,
            "plateau_steps": start,
            "run_steps": spec.steps,
            "after": scale["after"],
            "parameters": pipeline.cfg.parameter_count(),
            "seeds": per_seed,
            "plateau": {"val_steps": history.val_steps, "val_losses": history.val_losses},
            "measure_wall_s": time.monotonic() - started,
        }

    done: list[dict] = []
    for seed in seeds:
        partial = (lambda seed_so_far: save(result([*done, seed_so_far]))) if save else None
        done.append(
            measure_seed(pipeline, plateau, spec, start, seed, cases, scale["after"], val, log, partial)
        )
    return result(done)


def measured_path(name: str, strategy: str, quick: bool, seed: int | str = "*") -> str:
    """Where one scale's measurements of one seed are kept until the report is written (beside the cached models);
    seeds may run in separate processes."""
    return str(
        CACHE / f"measured-{'quick-' if quick else ''}{name}-{strategy.replace('+', 'plus')}-seed{seed}.json"
    )


def merged(pattern: str) -> dict | None:
    """One scale and strategy's measurements over every seed measured (files matching `pattern`)."""
    parts = [json.loads(Path(p).read_text()) for p in sorted(glob.glob(pattern))]
    if not parts:
        return None
    seeds = sorted((s for part in parts for s in part["seeds"]), key=lambda s: s["seed"])
    return {
        **parts[0],
        "seeds": seeds,
        "measure_wall_s": [p["measure_wall_s"] for p in parts],
        "machine": [p.get("machine") for p in parts],
    }


def plan(args) -> list[tuple[str, dict, str, list[int], list[float], bool]]:
    """(scale name, scale, strategy, stages, lr_scales, variants) of each measurement this invocation makes."""
    if args.quick:
        return [("small", QUICK["small"], "checkfree", [1], [1.1], False)]
    out = []
    for name in args.scales:
        lr_scales = [lr for lr in ([1.1, 1.0] if name == "small" else [1.1]) if lr in args.lr_scales]
        if "checkfree" in args.strategies:
            out.append(
                (
                    name,
                    SCALES[name],
                    "checkfree",
                    args.stages or SCALES[name]["stages"],
                    lr_scales,
                    name == "small" and 1.1 in lr_scales,
                )
            )
        if "checkfree+" in args.strategies and name == "small":
            out.append((name, SCALES[name], "checkfree+", [0, 3], [1.1], False))
    return out


def report(patterns: list[str], quick: bool) -> None:
    """Print the tables; write recovery_ablation.json, .png and .md from the measurements matching `patterns`."""
    results = [r for r in (merged(p) for p in patterns) if r is not None]
    if not results:
        print("no measurements yet")
        return
    summaries = [summarise(res) for res in results]
    tables = [table_text(res, rows) for res, rows in zip(results, summaries)]
    print("\n\n".join(tables))
    loads = [
        m["load_average"][0] for r in results for m in r["machine"] if m
    ]  # 1-min load when each part was saved
    load = [min(loads), max(loads)] if loads else list(os.getloadavg())
    stem = "recovery_ablation_quick" if quick else "recovery_ablation"
    payload = {
        "summaries": [
            {"scale": r["scale"], "strategy": r["strategy"], "rows": rows}
            for r, rows in zip(results, summaries)
        ],
        "tables": tables,
        "measurements": results,
        "within": WITHIN,
        "machine": machine_info(quick=quick, driver="in-process StageWorker stages (no Ray transport)"),
    }
    write_json(RESULTS / f"{stem}.json", payload)
    plot(results, RESULTS / f"{stem}.png")
    md = [
        "# CheckFree recovery ablation from a trained model (generated by benchmarks/recovery_ablation.py)",
        "",
        (
            "(a) validation loss right after the rebuild, before any step, minus the no-failure twin's; (b) steps "
            f"until the validation loss is back, and stays, within {WITHIN:.0%} of the twin's (measured at the "
            "offsets in the JSON; a run never back is counted at the horizon and listed as censored); (c) the loss "
            "at the end minus the twin's. Mean over seeds [95% paired interval]. 'exact' restores the lost "
            "stage's own weights with a fresh optimizer at the rebuilt learning rate: the upper bound of any "
            "weight rule; 'identity' makes the stage an exact skip."
        ),
        "",
        *[f"```\n{t}\n```\n" for t in tables],
        "## What the measurements show",
        "",
        *notes(results, summaries, load),
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / stem}.json, .png and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="Small scale, 2 seeds, one position, short runs."
    )
    parser.add_argument("--scales", nargs="*", default=list(SCALES), choices=list(SCALES))
    parser.add_argument(
        "--strategies", nargs="*", default=["checkfree", "checkfree+"], choices=["checkfree", "checkfree+"]
    )
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="Seeds (default 0 1 2; quick: 0 1)."
    )
    parser.add_argument(
        "--lr-scales",
        type=float,
        nargs="*",
        default=[1.1, 1.0],
        help="Learning-rate scales of the rebuilt stage to measure (1.0 only at the small scale).",
    )
    parser.add_argument(
        "--stages", type=int, nargs="*", default=None, help="Middle stages (default: the scale's)."
    )
    parser.add_argument(
        "--report-only", action="store_true", help="Only write the report of what was measured."
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    for name, scale, strategy, stages, lr_scales, variants in [] if args.report_only else plan(args):
        for seed in seeds:
            tag = (
                f"{seed}"
                + ("" if len(lr_scales) > 1 else f"-lr{lr_scales[0]}")
                + ("" if args.stages is None else "-stage" + "-".join(map(str, stages)))
            )
            path = Path(measured_path(name, strategy, args.quick, tag))

            def save(result: dict, path: Path = path) -> None:
                write_json(path, {**result, "machine": machine_info()})

            save(
                measure_scale(
                    name,
                    scale,
                    strategy,
                    [seed],
                    stages,
                    lr_scales,
                    variants,
                    log=lambda m: print(m, flush=True),
                    save=save,
                )
            )
    names = ["small"] if args.quick else list(SCALES)
    report([measured_path(n, s, args.quick) for n in names for s in ("checkfree", "checkfree+")], args.quick)


if __name__ == "__main__":
    main()
