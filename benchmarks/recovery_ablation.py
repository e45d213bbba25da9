"""The paper's recovery ablation (Figure 2) in shape: how a lost middle stage is rebuilt.

`python benchmarks/recovery_ablation.py [--quick] [--seeds 0 1]` trains the Table 2 benchmark model
(benchmarks/paper_table2.py) and kills a middle stage at the same step with the same seed, rebuilding it
by each `recovery.rule`: gradient-weighted average (CheckFree), plain average, copy of the previous
neighbour, random re-initialisation; plus a run without the failure. It measures the validation loss
N steps after the failure, prints a table, writes benchmarks/results/recovery_ablation.json and
recovery_ablation.png.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ray
from _common import machine_info, write_json
from paper_table2 import RESULTS, bench_spec, run_one

RULES = ["weighted", "average", "copy", "random"]


def _loss_at(run: dict, step: int) -> float | None:
    by_step = dict(zip(run["val_steps"], run["val_losses"]))
    return by_step.get(step)


def _clip_counts(runs: dict[int, dict[str, dict]]) -> dict[str, float]:
    """Over every run: CheckFree rebuilds, and those whose two neighbours' gradients were both clipped (then their
    post-clip norms are equal and the gradient-weighted rule is the plain average)."""
    costs = [run.get("costs", {}) for by_rule in runs.values() for run in by_rule.values()]
    return {"rebuilds": sum(c.get("checkfree_rebuilds", 0.0) for c in costs),
            "both_at_clip": sum(c.get("rebuilds_both_neighbours_at_clip", 0.0) for c in costs)}


def plot(runs: dict, fail_step: int, path: Path) -> None:
    """Validation loss against step per rule (first seed), and its excess over the run without the failure."""
    fig, (ax, ax_delta) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    base = dict(zip(runs["no failure"]["val_steps"], runs["no failure"]["val_losses"]))
    for name, run in runs.items():
        style = "--" if name == "no failure" else "-"
        ax.plot(run["val_steps"], run["val_losses"], style, lw=1.2, label=name)
        steps = [s for s in run["val_steps"] if s >= fail_step - 10 and s in base]
        by_step = dict(zip(run["val_steps"], run["val_losses"]))
        ax_delta.plot(steps, [by_step[s] - base[s] for s in steps], style, lw=1.2, label=name)
    for axis in (ax, ax_delta):
        axis.axvline(fail_step, color="red", alpha=0.5, lw=1, label="stage 1 killed" if axis is ax else None)
        axis.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax_delta.set_ylabel("minus the run without the failure")
    ax.set_title("Recovery of a lost middle stage (cf. paper Figure 2)")
    ax_delta.set_title("Excess validation loss after the failure")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="One seed, shorter runs.")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="Seeds (default 0 1; quick: 0).")
    parser.add_argument("--fail-step", type=int, default=None, help="Step at which stage 1 is killed.")
    parser.add_argument("--after", type=int, default=None, help="Steps after the failure to measure at.")
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    fail_step = args.fail_step or (50 if args.quick else 60)
    after = args.after or (30 if args.quick else 60)
    stage = 1
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    runs: dict[int, dict[str, dict]] = {}
    try:
        for seed in seeds:
            names = ["no failure", *RULES]
            for name in names:
                extra = {"eval_every": 5}
                if name != "no failure":
                    extra.update(recovery={"strategy": "checkfree", "rule": name},
                                 failures={"schedule": [[fail_step, stage]]})
                spec = bench_spec("none" if name == "no failure" else "checkfree", seed, fail_step + after, None,
                                  **extra)
                run = run_one(spec)
                runs.setdefault(seed, {})[name] = run
                print(f"seed {seed} {name}: loss at +{after} = {_loss_at(run, fail_step + after)} "
                      f"{run['error'] or ''}", flush=True)
    finally:
        ray.shutdown()
    table = {}
    for name in ["no failure", *RULES]:
        before = [_loss_at(runs[s][name], fail_step) for s in seeds]
        just_after = [_loss_at(runs[s][name], fail_step + 5) for s in seeds]
        end = [_loss_at(runs[s][name], fail_step + after) for s in seeds]
        table[name] = {"val_loss_at_failure": statistics.mean(before),
                       "val_loss_5_after": statistics.mean(just_after),
                       f"val_loss_{after}_after": statistics.mean(end),
                       "perplexity_end": math.exp(statistics.mean(end)),
                       "excess_over_no_failure": None}
    base = table["no failure"][f"val_loss_{after}_after"]
    for row in table.values():
        row["excess_over_no_failure"] = row[f"val_loss_{after}_after"] - base
    head = f"{'rule':<11} {'loss@fail':>9} {'loss@+5':>8} {f'loss@+{after}':>9} {'ppl':>6} {'excess':>7}"
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        lines.append(f"{name:<11} {row['val_loss_at_failure']:>9.3f} {row['val_loss_5_after']:>8.3f} "
                     f"{row[f'val_loss_{after}_after']:>9.3f} {row['perplexity_end']:>6.2f} "
                     f"{row['excess_over_no_failure']:>+7.3f}")
    clip = _clip_counts(runs)
    lines.append(f"CheckFree rebuilds with both neighbours at the clip (weighted = plain average): "
                 f"{clip['both_at_clip']:.0f} of {clip['rebuilds']:.0f}")
    text = "\n".join(lines)
    print(text)
    out = {"fail_step": fail_step, "stage": stage, "after": after, "seeds": seeds, "table": table, "clip": clip,
           "table_text": text, "runs": {str(s): r for s, r in runs.items()},
           "total_wall_s": time.monotonic() - started, "machine": machine_info(quick=args.quick), "notes": NOTES}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "recovery_ablation.json", out)
    plot(runs[seeds[0]], fail_step, RESULTS / "recovery_ablation.png")
    print(f"wrote {RESULTS / 'recovery_ablation.json'} and recovery_ablation.png in "
          f"{out['total_wall_s'] / 60:.1f} min")


NOTES = [
    "Setting: the Table 2 benchmark model (4 stages of one d=64 block each, byte-level), stage 1 killed at step 60 under strategy 'checkfree' with each recovery.rule, same seed and failure step; validation loss every 5 steps. 'val_loss_at_failure' is the evaluation right after the failure step was retried, so it already includes the damage of the rebuild.",
    "Differs from the paper's Figure 2 (weighted average > plain average > copy > random, perplexity 22.6 vs 29.2 vs 121 after 10k iterations): here all four rules end within about 0.03 nats of each other and of the run without a failure 60 steps later, and random re-initialisation is not worse; in seed 1 it is the least damaging right after the failure (weighted and copy cost ~0.04-0.05 nats at the failure step, random ~0).",
    "Why we think so: the failure comes at step 60 of a tiny model, when each block is still a small perturbation of the residual stream. A block freshly initialised with std 0.02 is then close to the identity (it removes one block's contribution), whereas an average or copy of a neighbour inserts a block trained for another depth. The paper's failures hit 500M-parameter models deep into training, where a missing block costs far more and neighbours are more alike. Testing that would need a later failure step (e.g. --fail-step 300 --after 200) and more seeds; there was no time for it on the shared 2 cores.",
    'Differences between rules are of the same order as the seed-to-seed spread and the evaluation noise (2 fixed validation micro-batches), so this ablation does not rank the rules at this scale.',
    'Recovery times (17 min for 10 runs, load average 35-70 on 2 cores) are not meaningful here; only losses are.',
]


if __name__ == "__main__":
    main()
