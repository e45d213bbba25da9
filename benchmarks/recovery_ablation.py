"""CheckFree's recovery ablation (paper Figure 2) from a trained model: how well does each rule rebuild a lost stage?

`python benchmarks/recovery_ablation.py [--quick] [--scales small deep] [--seeds 0 1 2] [--report-only]`

1. Trains each scale's model to a plateau once (a constant learning rate; cached as the engine's own checkpoint
   under outputs/bench-cache/recovery/, keyed by the spec's fingerprint; `recovery_inprocess.py`).
2. For each seed, continues training from the plateau on that seed's data stream; after a delay drawn from the
   seed's failure stream, a stage is lost and rebuilt by each rule: weighted (CheckFree), average, copy, random,
   identity (the stage becomes an exact skip) and exact (its own same-step weights: the upper bound), at two middle
   positions, with `recovery.lr_scale` 1.1 and 1.0; plus an outer stage under CheckFree+ rebuilt by copying its
   swap partner (from a model trained under CheckFree+). The no-failure twin continues the same snapshot.
3. Measures (a) the validation loss right after the rebuild, before any step, (b) steps until the validation loss
   is back within 1% of the twin's, (c) the loss at the end, each as a paired difference against the twin with a
   95% interval over seeds (the harness's paired table), and weighted against the other rules.
4. Writes benchmarks/results/recovery_ablation.json, .png and .md (the .md is generated from the measured values).

On the benchmark harness: a config is one (scale, strategy, lr scale, stage) and a row one seed of it (the twin
and every rule from the same snapshot); rows are cached under outputs/bench/rows/ as they are measured, so a
killed run resumes, and configs can run in separate processes (`--scales small --lr-scales 1.1 --stages 1
--seeds 0`). Every run ends with the report over every config and seed measured so far (`--report-only`: only
the report, from the row cache or the rows of the written result).

The stages are the engine's `StageWorker`s driven in one process (the same model, optimizer, clipping, norms and
recovery code; no Ray transport): see recovery_inprocess.py.

Runtime measured here (2 shared cores, load average 50-110): training the small model to step 2000 took about
35 min, the deep one to step 750 about 13 min, the CheckFree+ one to step 750 about 25 min (each once; cached);
the ablation itself, one process per (seed, lr scale, stage), about 6 min for the small scale (12 processes),
7 min for the deep one (3). --quick trains a 300-step model and measures one stage with 2 seeds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness
from recovery_ablation_report import notes, plot, summarise, table_text
from recovery_inprocess import LocalPipeline, trained_pipeline

from checkfree_ray.data import FAILURE_STREAM, make_corpus, step_rng
from schemas.train import TrainSpec

NAME = "recovery_ablation"
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
    log: Callable[[str], None],
) -> dict:
    """One seed: continue the plateau on the seed's data, lose a stage after the seed's delay, and measure the
    twin and every case ({stage, rule, lr_scale, variant}) from the same snapshot."""
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


DESCRIBE = (
    "(a) validation loss right after the rebuild, before any step, minus the no-failure twin's; (b) steps "
    f"until the validation loss is back, and stays, within {WITHIN:.0%} of the twin's (measured at the "
    "offsets in the JSON; a run never back is counted at the horizon and listed as censored); (c) the loss "
    "at the end minus the twin's. Mean over seeds [95% paired interval]. 'exact' restores the lost "
    "stage's own weights with a fresh optimizer at the rebuilt learning rate: the upper bound of any "
    "weight rule; 'identity' makes the stage an exact skip."
)


def configs(
    quick: bool,
    scales: list[str] | None = None,
    strategies: tuple[str, ...] = ("checkfree", "checkfree+"),
    lr_scales: tuple[float, ...] = (1.1, 1.0),
    stages: list[int] | None = None,
) -> dict[str, dict]:
    """One config per (scale, strategy, lr scale, stages): lr x1.0 at the small scale only, the weighing-norm
    variants at the small scale's lr x1.1, CheckFree+ (its outer stages) at the small scale; quick: one stage."""
    if quick:
        return {
            "small/checkfree/lr1.1/stage1": _config("small", QUICK["small"], "checkfree", 1.1, [1], False)
        }
    out = {}
    for name in scales or list(SCALES):
        scale = SCALES[name]
        if "checkfree" in strategies:
            for lr in [lr for lr in ([1.1, 1.0] if name == "small" else [1.1]) if lr in lr_scales]:
                for stage in stages or scale["stages"]:
                    variants = name == "small" and lr == 1.1
                    out[f"{name}/checkfree/lr{lr}/stage{stage}"] = _config(
                        name, scale, "checkfree", lr, [stage], variants
                    )
        if "checkfree+" in strategies and name == "small" and 1.1 in lr_scales:
            out[f"{name}/checkfree+/lr1.1/stage0+3"] = _config(name, scale, "checkfree+", 1.1, [0, 3], False)
    return out


def _config(
    name: str, scale: dict, strategy: str, lr_scale: float, stages: list[int], variants: bool
) -> dict:
    return {
        "scale": name,
        "sizes": scale,
        "strategy": strategy,
        "lr_scale": lr_scale,
        "stages": stages,
        "variants": variants,
    }


class Plateaus:
    """Each scale and strategy's trained model, loaded (or trained) once per process and measured from."""

    def __init__(self, log: Callable[[str], None]):
        self.log, self.loaded = log, {}

    def __call__(self, config: dict) -> tuple:
        """(pipeline, plateau snapshot, facts of the trained model, spec, start step, validation set)."""
        scale, strategy = config["sizes"], config["strategy"]
        spec = plateau_spec(scale, strategy)
        key = spec.name, spec.steps
        if key not in self.loaded:
            val = validation_set(spec)
            start = scale.get("start" if strategy == "checkfree" else "start_plus", spec.steps)
            self.log(
                f"{config['scale']} / {strategy}: trained model at step {start} of its run's {spec.steps}"
            )
            pipeline, history = trained_pipeline(spec, val, until=start, log=self.log)
            facts = {
                "scale": config["scale"],
                "strategy": strategy,
                "model": scale["model"],
                "pipeline": PIPELINE,
                "plateau_steps": start,
                "run_steps": spec.steps,
                "after": scale["after"],
                "parameters": pipeline.cfg.parameter_count(),
                "plateau": {"val_steps": history.val_steps, "val_losses": history.val_losses},
            }
            self.loaded[key] = pipeline, pipeline.snapshot(), facts, spec, start, val
        return self.loaded[key]


def measurer(log: Callable[[str], None]) -> harness.Measure:
    """measure(config name, config, seed): the twin and every case of the config on one seed (a row)."""
    plateaus = Plateaus(log)

    def measure(name: str, config: dict, seed: int) -> dict:
        pipeline, plateau, facts, spec, start, val = plateaus(config)
        cases = cases_for(config["strategy"], config["stages"], [config["lr_scale"]], config["variants"])
        after = config["sizes"]["after"]
        result = measure_seed(pipeline, plateau, spec, start, seed, cases, after, val, log)
        result.pop("seed")
        return {**facts, **result, "load_average_1min": os.getloadavg()[0]}

    return measure


def scale_results(rows: list[dict]) -> list[dict]:
    """The rows as one result per (scale, strategy), in the configs' order, its seeds in order."""
    results: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: (r["seed"], r["runs"][0]["lr_scale"], r["runs"][0]["stage"])):
        facts = {k: row[k] for k in ("scale", "strategy", "model", "pipeline", "plateau_steps", "run_steps")}
        facts |= {k: row[k] for k in ("after", "parameters", "plateau")}
        result = results.setdefault((row["scale"], row["strategy"]), {**facts, "seeds": [], "loads": []})
        result["seeds"].append({k: row[k] for k in ("seed", "fail_step", "offsets", "twin", "runs")})
        result["loads"].append(row["load_average_1min"])
    order = list(dict.fromkeys((r["scale"], r["strategy"]) for r in rows))
    return [results[key] for key in order]


def report(args, record: dict, rows: list[dict], sweep: harness.Sweep) -> None:
    """Print the tables; write recovery_ablation.json, .png and .md from `rows` (the harness's `finish`)."""
    if not rows:
        print("no measurements yet")
        return
    results = scale_results(rows)
    summaries = [summarise(res) for res in results]
    tables = [table_text(res, rows) for res, rows in zip(results, summaries)]
    print("\n\n".join(tables))
    load = [x for r in results for x in r["loads"]]  # 1-min load when each row was measured
    sweep.extra.update(
        summaries=[
            {"scale": r["scale"], "strategy": r["strategy"], "rows": rows}
            for r, rows in zip(results, summaries)
        ],
        tables=tables,
        measurements=[{k: v for k, v in r.items() if k not in ("seeds", "loads")} for r in results],
        within=WITHIN,
    )
    out = harness.results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / f"{NAME}.png")
    harness.finish(
        sweep,
        args,
        record,
        rows,
        title=f"CheckFree recovery ablation from a trained model (generated by benchmarks/{NAME}.py)",
        sections=[
            (
                "Results",
                "\n".join(f"```\n{t}\n```\n" for t in tables)
                + f"\n![excess loss after the rebuild]({NAME}.png)",
            ),
            ("What the measurements show", "\n".join(notes(results, summaries, load))),
        ],
    )


def main() -> None:
    cli = harness.parser(__doc__, seeds=[0, 1, 2], quick_seeds=[0, 1])
    cli.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    cli.add_argument(
        "--strategies", nargs="+", default=["checkfree", "checkfree+"], choices=["checkfree", "checkfree+"]
    )
    cli.add_argument(
        "--lr-scales",
        type=float,
        nargs="+",
        default=[1.1, 1.0],
        help="Learning-rate scales of the rebuilt stage to measure (1.0 only at the small scale).",
    )
    cli.add_argument(
        "--stages", type=int, nargs="+", default=None, help="Middle stages (default: the scale's)."
    )
    cli.add_argument("--report-only", action="store_true", help="Only write the report of what was measured.")
    args = cli.parse_args()
    torch.set_num_threads(1)
    out = harness.results_dir(args)
    record = harness.run_record(args, driver="in-process StageWorker stages (no Ray transport)")
    log = lambda m: print(m, flush=True)
    seeds = harness.chosen_seeds(args)
    if not args.report_only:
        chosen = configs(args.quick, args.scales, tuple(args.strategies), tuple(args.lr_scales), args.stages)
        harness.run_sweep(harness.Sweep(NAME, chosen, seeds, measurer(log)), out, fresh=args.fresh)
    every = sorted({*seeds, *(args.quick_seeds if args.quick else args.default_seeds)})
    sweep = harness.Sweep(NAME, configs(args.quick), every, measurer(log), describe=DESCRIBE)
    report(args, record, harness.measured_rows(sweep, out), sweep)


if __name__ == "__main__":
    main()
