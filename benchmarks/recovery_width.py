"""CheckFree's recovery rules against model width: does the paper's ranking appear as the model grows?

`python benchmarks/recovery_width.py [--quick] [--plan 64:2 128:2 ...] [--report-only]`

The protocol of `recovery_ablation.py` (a trained model, one middle stage lost, every rule applied to copies of the
same state, paired over seeds, against the no-failure twin) at several widths d (4 layers, one block per stage,
4 stages), each trained at a constant learning rate for the same number of tokens per parameter k (a plan entry
`d:k`), so every width stops at the same point of its compute budget. Rules: weighted (CheckFree), average, copy,
random (the model's own initialisation: normal std 0.02 weights, unit RMSNorm gains; the paper does not state its
initialiser) and identity (the stage an exact skip).

Each width's training is the engine's own checkpoint (`recovery_inprocess.trained_pipeline`, cached under
outputs/bench-cache/recovery/<fingerprint>/, resumed when interrupted, a validation loss and checkpoint every 100
steps). On the benchmark harness, a config is one plan entry (d, k) and a row one seed of it; rows are cached
under outputs/bench/rows/ as they are measured and never measured again, so the study can be built up over
several sittings (`nice -n 15 python benchmarks/recovery_width.py > log &`). The plan runs one entry at a time,
every seed of it (a sweep each): entries of one width must run in increasing k, since the cache keeps one
checkpoint and the entry is measured when training reaches it. Per (width, k) it also measures the residual
stream's RMS entering each lost stage against the RMS of what a trained block and a freshly initialised block
add to it (`residual_norms`).

Writes benchmarks/results/recovery_width.json, .png and .md (generated from the measured values); every run ends
with the report over every plan entry and seed measured so far (`--report-only`: only the report, from the row
cache or the rows of the written result). `--quick`: d=32 to 1 token per parameter, one stage, 2 seeds, 20 steps
after the rebuild, written under outputs/bench/quick/.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness
from recovery_ablation import measure_seed, validation_set
from recovery_inprocess import LocalPipeline, trained_pipeline
from recovery_width_report import DESCRIBE, report

from checkfree_ray.recovery_rules import BLOCKS, plain_order, recovered_lr, reinitialised_blocks, route
from schemas.train import TrainSpec

RULES = ["weighted", "average", "copy", "random", "identity"]
STAGES = [1, 2]
SEEDS = [0, 1, 2]
AFTER = 50  # steps measured after the rebuild
LAYERS, HEADS, SEQ = 4, 4, 64
PIPELINE = {"num_stages": 4, "micro_batches": 2, "micro_batch_size": 8}
TOKENS_PER_STEP = PIPELINE["micro_batches"] * PIPELINE["micro_batch_size"] * SEQ
MAX_TOKENS_PER_PARAM = 6  # the spec's `steps` (part of its fingerprint): the longest plan entry of any width
EVERY = 100  # validation loss and checkpoint interval of the training
NAME = "recovery_width"
DEFAULT_PLAN = [
    "64:2.19",
    "32:2.19",
    "48:2.19",
    "32:5.5",
    "48:5.5",
    "64:5.5",
    "128:2.19",
    "96:2.19",
    "192:2.19",
    "256:2.19",
]
QUICK = {"plan": ["32:1"], "stages": [1], "after": 20, "fresh_shapes": [(64, 1), (128, 1)]}


def model_of(d: int) -> dict:
    """The model of width `d` (the layers, heads and sequence length of every width)."""
    return {"d_model": d, "n_layers": LAYERS, "n_heads": HEADS, "seq_len": SEQ}


def parameters(d: int) -> int:
    """Parameter count of width `d` (the engine's own count)."""
    from checkfree_ray.model import ModelConfig

    return ModelConfig.from_train_spec(width_spec(d, steps=1)).parameter_count()


def steps_for(d: int, tokens_per_param: float) -> int:
    """Training steps (to the nearest 10) that give width `d` `tokens_per_param` tokens per parameter."""
    return max(10, round(tokens_per_param * parameters(d) / TOKENS_PER_STEP / 10) * 10)


def run_steps(d: int) -> int:
    """The spec's `steps` of width `d` (part of its fingerprint, so fixed): MAX_TOKENS_PER_PARAM to the nearest
    100 steps; every plan entry of the width stops at or before it."""
    return max(EVERY, round(MAX_TOKENS_PER_PARAM * parameters(d) / TOKENS_PER_STEP / EVERY) * EVERY)


def width_spec(d: int, steps: int | None = None, quick: bool = False) -> TrainSpec:
    """The training spec of width `d` (steps: `run_steps`, so one run serves every k); quick runs train their own."""
    return TrainSpec.model_validate(
        {
            "name": f"recovery-width-{'quick-' if quick else ''}d{d}",
            "seed": 0,
            "steps": steps if steps is not None else run_steps(d),
            "model": model_of(d),
            "pipeline": PIPELINE,
            "optim": {"lr": 3e-3},
            "recovery": {"strategy": "checkfree", "lr_scale": 1.1},
        }
    )


def rms(t: torch.Tensor) -> float:
    """Root mean square of a tensor's entries."""
    return float(t.float().pow(2).mean().sqrt())


@torch.no_grad()
def residual_norms(pipeline: LocalPipeline, val, stage: int, seed: int = 0) -> dict:
    """RMS of the residual stream entering `stage` (validation inputs) and of what its trained blocks and a
    freshly initialised ('random' rule) stage add to it; the ratio fresh/stream says how near a skip a random
    rebuild is."""
    inputs = val[0]
    hops = route(plain_order(pipeline.S), pipeline.S)
    streams = []
    for mb in range(inputs.shape[0]):
        x = inputs[mb]
        for hop, (s, parts) in enumerate(hops):
            if s == stage:
                streams.append(torch.as_tensor(x))
                break
            x = pipeline.workers[s].forward(mb, hop, parts, x, None, 1.0, False)
    x = torch.cat(streams)
    blocks = reinitialised_blocks(pipeline.cfg, stage, seed, "random")
    fresh = pipeline._fresh(stage, recovered_lr(pipeline.spec.optim.lr, 1.1), blocks)
    trained_delta = pipeline.workers[stage].parts[BLOCKS](x) - x
    fresh_delta = fresh.parts[BLOCKS](x) - x
    return {
        "stage": stage,
        "stream_rms": rms(x),
        "trained_delta_rms": rms(trained_delta),
        "fresh_delta_rms": rms(fresh_delta),
        "fresh_over_stream": rms(fresh_delta) / rms(x),
        "trained_over_stream": rms(trained_delta) / rms(x),
    }


FRESH_SHAPES = [(64, 1), (128, 1), (256, 1), (512, 1), (512, 3), (1024, 1), (1024, 4), (2048, 1), (2048, 4)]


@torch.no_grad()
def fresh_stage_rms(d: int, blocks: int, seed: int = 0) -> float:
    """RMS of what a freshly initialised stage of `blocks` pre-norm blocks (the model's std-0.02 initialisation,
    head dim 64) adds to a unit-RMS input; RMSNorm before each branch makes it nearly independent of the input's
    scale, so dividing by a stream's RMS gives how near a skip a 'random' rebuild is at width d."""
    from checkfree_ray.model import ModelConfig, Stage, _init_weights

    spec = width_spec(d, steps=1)
    model = {**spec.model.model_dump(), "n_layers": 4 * blocks, "n_heads": max(1, d // 64)}
    cfg = ModelConfig.from_train_spec(spec.model_copy(update={"model": spec.model.model_copy(update=model)}))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        stage = Stage(cfg)
        stage.apply(_init_weights)
        x = torch.randn(2, SEQ, d)
    finally:
        torch.random.set_rng_state(state)
    return rms(stage(x) - x)


def config(d: int, k: float, quick: bool = False) -> dict:
    """One plan entry's config: the width, its tokens per parameter, and what is measured from it."""
    stages, after = (QUICK["stages"], QUICK["after"]) if quick else (STAGES, AFTER)
    return {
        "d_model": d,
        "tokens_per_param": k,
        "stages": stages,
        "rules": RULES,
        "after": after,
        "quick": quick,
    }


def config_name(d: int, k: float) -> str:
    return f"d={d} k={k:g}"


def measurer(log: Callable[[str], None]) -> harness.Measure:
    """measure(config name, config, seed): the entry's width trained to its k (once per process, resuming its
    cached run), then the twin and every rule at every stage on one seed (a row)."""
    loaded: dict[tuple, tuple] = {}

    def trained(cfg: dict) -> tuple:
        d, k = cfg["d_model"], cfg["tokens_per_param"]
        if (d, k) not in loaded:
            loaded.clear()  # one width and k at a time: the cache's checkpoint moves on with k
            spec = width_spec(d, quick=cfg["quick"])
            start, val = steps_for(d, k), validation_set(spec)
            log(f"d={d} k={k:g}: {parameters(d)} parameters, step {start} of {spec.steps}")
            began = time.monotonic()
            pipeline, history = trained_pipeline(spec, val, until=start, every=EVERY, log=log)
            facts = {
                "d_model": d,
                "tokens_per_param": k,
                "model": model_of(d),
                "pipeline": PIPELINE,
                "parameters": parameters(d),
                "plateau_steps": start,
                "run_steps": spec.steps,
                "after": cfg["after"],
                "plateau": {"val_steps": history.val_steps, "val_losses": history.val_losses},
                "residual_norms": [residual_norms(pipeline, val, s) for s in cfg["stages"]],
                "train_wall_s_this_sitting": time.monotonic() - began,
            }
            loaded[(d, k)] = pipeline, pipeline.snapshot(), facts, spec, start, val
        return loaded[(d, k)]

    def measure(name: str, cfg: dict, seed: int) -> dict:
        pipeline, plateau, facts, spec, start, val = trained(cfg)
        cases = [
            {"name": r, "rule": r, "stage": s, "lr_scale": 1.1} for s in cfg["stages"] for r in cfg["rules"]
        ]
        result = measure_seed(pipeline, plateau, spec, start, seed, cases, cfg["after"], val, log)
        result.pop("seed")
        return {**facts, **result, "load_average_1min": os.getloadavg()[0]}

    return measure


def parse_plan(entries: list[str]) -> list[tuple[int, float]]:
    """'d:k' entries as (width, tokens per parameter); refuses k above the run's length."""
    plan = []
    for entry in entries:
        d, _, k = entry.partition(":")
        if not k or not 0 < float(k) or steps_for(int(d), float(k)) > run_steps(int(d)):
            raise SystemExit(
                f"--plan entry {entry!r}: write d:k with 0 < k and k x parameters within the run's "
                f"{MAX_TOKENS_PER_PARAM} tokens per parameter"
            )
        plan.append((int(d), float(k)))
    return plan


def main() -> None:
    cli = harness.parser(__doc__, seeds=SEEDS, quick_seeds=[0, 1])
    cli.add_argument("--plan", nargs="+", default=None, help="width:tokens-per-parameter entries")
    cli.add_argument("--report-only", action="store_true", help="Only write the report of what was measured.")
    args = cli.parse_args()
    torch.set_num_threads(1)
    out, quick = harness.results_dir(args), args.quick
    record = harness.run_record(args, driver="in-process StageWorker stages (no Ray transport)")
    log = lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)
    plan = parse_plan(args.plan or (QUICK["plan"] if quick else DEFAULT_PLAN))
    seeds = harness.chosen_seeds(args)
    if not args.report_only:
        measure = measurer(log)
        for index, (d, k) in enumerate(
            plan
        ):  # one entry at a time, every seed of it (the module's docstring)
            entry = {config_name(d, k): config(d, k, quick)}
            fresh = args.fresh and index == 0  # the row cache is emptied once, before the first entry
            harness.run_sweep(harness.Sweep(NAME, entry, seeds, measure), out, fresh=fresh)
    everything = [*parse_plan(QUICK["plan"] if quick else DEFAULT_PLAN), *plan]
    configs = {config_name(d, k): config(d, k, quick) for d, k in everything}
    every = sorted({*seeds, *(args.quick_seeds if quick else args.default_seeds)})
    sweep = harness.Sweep(NAME, configs, every, measurer(log), describe=DESCRIBE)
    rows = harness.measured_rows(sweep, out)
    shapes = QUICK["fresh_shapes"] if quick else FRESH_SHAPES
    fresh = [{"d_model": d, "blocks": b, "fresh_delta_rms": fresh_stage_rms(d, b)} for d, b in shapes]
    first = configs[config_name(*plan[0])]
    # steps run per seed in the measurement: the run-up to the failure (up to 20), the twin and each rule's run
    measure_steps = len(SEEDS) * (len(first["stages"]) * len(RULES) + 1) * first["after"] + len(SEEDS) * 20
    report(args, record, rows, sweep, fresh, plan, measure_steps)


if __name__ == "__main__":
    main()
