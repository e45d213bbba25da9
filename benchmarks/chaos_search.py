"""LCSC search under chaos: evaluators, Tune trial actors and the driver killed, a node drained, at seeded moments.

Each run is a small seeded search (5 tiny checkpoints, 64-sample FIDs, `--budget` evaluations) started as
`python -m lcsc_ray search spec.json` in its own process with its own local Ray. While it runs, the harness
kills, when the search has recorded a seeded number of evaluations:
- an evaluator actor's process (`ray::Evaluator`, preferably mid-evaluation),
- a Tune trial actor's process (`ray::ImplicitFunc`, preferably while its trial waits on the pool),
- the driver itself (SIGKILL of the `python -m lcsc_ray search` process alone); the search is then run again
  and must resume;
- a preemption notice (`ray drain-node`) for the node that holds both evaluators while each has a candidate in
  flight, the node killed at the notice's deadline (`chaos_search_drain.py`: chaos runs use a local multi-node
  Ray for this; twins run on a local Ray).
Every process the search starts inherits a marker variable, so the harness finds the Ray workers of that
search (and nothing else) in /proc. Each chaos run is compared with its uninterrupted twin (same spec, same
seed, no kills). A run passes when it ends with exactly `budget` evaluations, each recorded once (one proposal
record per optimiser proposal, one stored evaluation per candidate), the twin's trials and winner, and no
leaked process (nothing carrying the marker outlives a driver, killed or finished). Run from the repository root:

    .venv/bin/python benchmarks/chaos_search.py [--quick] [--seeds 0 1] [--optimizers CMA NGOpt] [--budget B]

Runtime: each run is a chaos search (with its cluster) and its uninterrupted twin; 4 runs without the drain event
took about 16 minutes at load average 18-27 on 2 cores (3.5-5 minutes a run); --quick (1 run, budget 10) is one
such run.

It prints a table and writes benchmarks/results/chaos_search.json (--quick: outputs/bench/quick/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import harness
from chaos_search_drain import DrainCluster, drain_cluster

MARK = "LCSC_CHAOS_RUN"  # every process of one driver (its Ray included) carries MARK=<run tag>
KINDS = ("evaluator", "trial", "driver", "drain")
TITLES = {"evaluator": "ray::Evaluator", "trial": "ray::ImplicitFunc"}
DRIVER_TIMEOUT_S = 900.0  # one driver run, from start to exit
# How long a finished or killed driver's processes may take to exit. After a SIGKILL of the driver, Ray's
# dashboard and runtime-env agents notice their raylet is gone within seconds but then spend up to 60 s
# trying to report that to the (dead) GCS before exiting (ray/_private/utils.py publish_error_to_driver).
GONE_TIMEOUT_S = 150.0
WATCHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="leak-watch")
# Each tiny evaluation takes at least this long: at milliseconds each, a search recorded its whole budget between
# two polls of a harness that scans /proc on crowded cores, and the planned kills never fired.
SAMPLE_S = 1.0
BUSY_WAIT_S = 20.0  # how long to wait for a busy target before killing an idle one


# ------------------------------------------------------------------------------------------ the case
def chaos_spec(workdir: Path, seed: int, optimizer: str, budget: int) -> dict:
    """A search over 5 tiny checkpoints (the test plug-ins) with 64-sample FIDs; the sampler logs each call."""
    from tests.lcsc_plugins import write_run

    if not (workdir / "ckpts").exists():
        write_run(workdir / "ckpts", num=5)
    (workdir / "calls").mkdir(parents=True, exist_ok=True)
    return {
        "seed": seed,
        "checkpoints": {"uri": str(workdir / "ckpts")},
        "model": {"target": "tests.lcsc_plugins:build_tiny"},
        "sampler": {
            "target": "tests.lcsc_search_plugins:counting_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(workdir / "calls"), "seconds": SAMPLE_S},
        },
        "fid": {
            "features": {"target": "tests.lcsc_plugins:tiny_features"},
            "reference": {"dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}},
            "num_samples": 64,
            "holdout_seeds": [11, 12],
        },
        "evaluators": {"num_actors": 2, "batch_size": 64, "num_cpus": 0.5},
        "search": {"budget": budget, "optimizer": optimizer, "ema_decays": [0.5, 0.8]},
        "output": {"uri": str(workdir / "out")},
    }


def kill_plan(seed: int, budget: int) -> list[tuple[str, int]]:
    """One event of each kind at a seeded, distinct number of recorded evaluations in [2, budget - 2],
    in the order they fire."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    moments = rng.choice(np.arange(2, budget - 1), size=len(KINDS), replace=False)
    return sorted(zip(KINDS, (int(m) for m in moments)), key=lambda kind_moment: kind_moment[1])


# -------------------------------------------------------------------------------------- processes
def marked_processes(tag: str) -> dict[int, str]:
    """pid -> process title of every live process carrying MARK=tag (the driver and its Ray)."""
    needle = f"{MARK}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie has exited; only its parent's wait is missing
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                found[int(entry)] = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_gone(tag: str, timeout_s: float = GONE_TIMEOUT_S) -> tuple[dict[int, str], float]:
    """Wait (bounded) until no process carries the tag, then SIGKILL any still alive (leaked).
    Returns (leaked pid -> title, seconds until the last one exited or the deadline)."""
    start = time.monotonic()
    while (alive := marked_processes(tag)) and time.monotonic() - start < timeout_s:
        time.sleep(0.2)
    end_leaked(alive)
    return alive, time.monotonic() - start


def end_leaked(leaked: dict[int, str]) -> None:
    """SIGKILL leaked processes (all started by this harness's driver) by pid, so the next run starts clean."""
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def pick_target(tag: str, kind: str, driver_pid: int, since: float) -> int | None:
    """The pid to kill for `kind`: the driver, else a busy actor process of that kind (its title names the
    method it runs), or after BUSY_WAIT_S an idle one; None when there is none yet."""
    if kind == "driver":
        return driver_pid
    processes = [
        (pid, title) for pid, title in marked_processes(tag).items() if title.startswith(TITLES[kind])
    ]
    busy = [pid for pid, title in processes if "." in title.split()[0].removeprefix("ray::")]
    if busy:
        return min(busy)
    if processes and time.monotonic() - since > BUSY_WAIT_S:
        return min(pid for pid, _ in processes)
    return None


def busy_evaluators(tag: str) -> int:
    """Evaluator processes of the run that are inside a call (their title names the method)."""
    return sum(
        1
        for title in marked_processes(tag).values()
        if title.startswith(TITLES["evaluator"]) and "." in title.split()[0].removeprefix("ray::")
    )


def recorded(out: Path) -> int:
    """Evaluations the search has recorded so far."""
    return len(list((out / "state" / "evaluations").glob("*.json")))


# --------------------------------------------------------------------------------------- one driver
@dataclass
class DriverRun:
    """What one driver process did: its exit code, the kills that fired in it, what outlived it."""

    returncode: int
    kills: list[dict] = field(default_factory=list)
    log_tail: str = ""
    watch: Future | None = None  # wait_gone(tag), running beside the next driver

    @property
    def leaked(self) -> dict[int, str]:
        """Processes of this driver still alive GONE_TIMEOUT_S after it ended (then killed by the harness)."""
        return self.watch.result()[0]

    @property
    def exit_s(self) -> float:
        """Seconds from the driver's end until its last process exited."""
        return self.watch.result()[1]


def run_driver(
    spec_path: Path,
    tag: str,
    plan: list[tuple[str, int]],
    out: Path,
    log_path: Path,
    cluster: DrainCluster | None = None,
) -> DriverRun:
    """Run `python -m lcsc_ray search spec` once (on `cluster` when given); fire the planned events whose moment
    has come (removing them from `plan`); stop at a driver kill. Waits for every process of the driver to exit,
    bounded."""
    env = {
        **os.environ,
        **(cluster.driver_env(MARK, tag) if cluster else {}),
        "PYTHONPATH": str(ROOT),
        MARK: tag,
        "OMP_NUM_THREADS": "1",
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lcsc_ray", "search", str(spec_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = DriverRun(returncode=0)
    deadline, due_since = time.monotonic() + DRIVER_TIMEOUT_S, None
    while proc.poll() is None and time.monotonic() < deadline:
        if cluster is not None and cluster.reclaim_due():
            run.kills.append(
                {"kind": "reclaim", "moment": -1, "at_recorded": recorded(out), "title": "node A"}
            )
        notice = cluster.drain_if_ready(lambda: busy_evaluators(tag)) if cluster is not None else None
        if notice is not None:
            run.kills.append({"kind": "drain", "at_recorded": recorded(out), **notice})
        if plan and plan[0][0] == "drain" and recorded(out) >= plan[0][1]:
            cluster.arm(
                plan.pop(0)[1]
            )  # fires once both evaluators are busy; the other events go on meanwhile
        elif plan and recorded(out) >= plan[0][1]:
            due_since = due_since or time.monotonic()
            kind, moment = plan[0]
            pid = pick_target(tag, kind, proc.pid, due_since)
            if pid is not None:
                title = marked_processes(tag).get(pid, "?")
                os.kill(pid, signal.SIGKILL)
                run.kills.append(
                    {"kind": kind, "moment": moment, "at_recorded": recorded(out), "title": title}
                )
                plan.pop(0)
                due_since = None
                if kind == "driver":
                    break
        time.sleep(0.05)
    if proc.poll() is None and not (run.kills and run.kills[-1]["kind"] == "driver"):
        os.killpg(proc.pid, signal.SIGKILL)  # ran past DRIVER_TIMEOUT_S: a hang
        run.kills.append({"kind": "timeout", "moment": -1, "at_recorded": recorded(out), "title": "driver"})
    run.returncode = proc.wait(timeout=60)
    run.watch = WATCHERS.submit(wait_gone, tag)
    run.log_tail = log_path.read_text(errors="replace")[-2000:]
    return run


def search_until_done(
    workdir: Path, spec: dict, tag: str, plan: list[tuple[str, int]], cluster: DrainCluster | None = None
) -> tuple[list[DriverRun], float]:
    """Run the driver, and again after each driver kill, until it exits by itself (at most 1 + kills times)."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = Path(spec["output"]["uri"])
    started, drivers = time.monotonic(), []
    for attempt in range(1 + len(plan)):
        run = run_driver(spec_path, f"{tag}-{attempt}", plan, out, workdir / "driver.log", cluster)
        drivers.append(run)
        if not (run.kills and run.kills[-1]["kind"] == "driver"):
            break
    return drivers, time.monotonic() - started


# --------------------------------------------------------------------------------------- the checks
def search_rows(out: Path) -> pd.DataFrame:
    """The search's evaluations (rung 0) as comparable rows: phase, label, status, FID, coefficients."""
    trials = pd.read_parquet(out / "trials.parquet")
    rows = trials[trials.rung == 0]
    return pd.DataFrame(
        {
            "phase": rows.phase,
            "label": rows.label,
            "status": rows.status,
            "fid": rows.fid.round(9),
            "coefficients": [tuple(np.round(c, 9)) for c in rows.coefficients],
        }
    ).reset_index(drop=True)


def winner(out: Path) -> list[float]:
    """The result's winning coefficients."""
    return json.loads((out / "result.json").read_text())["best"]["coefficients"]


def recorded_once(out: Path, rows: pd.DataFrame, num_seeds: int) -> bool:
    """One proposal record per optimiser proposal (indices 0..n-1, each finished) and one stored evaluation
    per distinct candidate at the search's sample count and seed."""
    proposals = [json.loads(p.read_text()) for p in sorted((out / "state" / "proposals").glob("*.json"))]
    indices_ok = [p["index"] for p in proposals] == list(range(len(rows) - num_seeds))
    all_done = all(p["done"] and p["value"] is not None for p in proposals)
    search_keys = list((out / "state" / "evaluations").glob("*-n64-s0.json"))
    return indices_ok and all_done and len(search_keys) == len(set(rows.coefficients))


def check_run(out: Path, twin: Path, budget: int, num_seeds: int, drivers: list[DriverRun]) -> dict:
    """The pass criteria of one chaos run against its twin."""
    if drivers[-1].returncode != 0 or not (out / "result.json").exists():
        return {
            "evaluations": None,
            "recorded_once": False,
            "same_trials": False,
            "same_winner": False,
            "error": drivers[-1].log_tail[-600:],
        }
    rows, twin_rows = search_rows(out), search_rows(twin)
    return {
        "evaluations": len(rows),
        "all_ok": bool((rows.status == "ok").all()),
        "recorded_once": recorded_once(out, rows, num_seeds) and len(rows) == budget,
        "same_trials": bool(rows.equals(twin_rows)),
        "same_winner": winner(out) == winner(twin),
    }


def sampler_calls(workdir: Path) -> int:
    """Sampler calls the run's evaluators logged (0 when none was made: a driver that failed before any)."""
    log = workdir / "calls" / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


# ----------------------------------------------------------------------------------------- one run
def chaos_run(index: int, seed: int, optimizer: str, budget: int, base: Path) -> dict:
    """The twin (no kills), then the same search with one event of each kind (on its own cluster, for the drain);
    their comparison."""
    row: dict = {"run": index, "seed": seed, "optimizer": optimizer}
    twin_dir, chaos_dir = base / f"run{index}-twin", base / f"run{index}-chaos"
    twin_drivers, twin_s = search_until_done(
        twin_dir, chaos_spec(twin_dir, seed, optimizer, budget), f"r{index}-twin-{os.getpid()}", []
    )
    plan = kill_plan(seed, budget)
    row["plan"] = [list(step) for step in plan]
    with drain_cluster(base / f"run{index}-cluster") as cluster:
        drivers, wall_s = search_until_done(
            chaos_dir,
            chaos_spec(chaos_dir, seed, optimizer, budget),
            f"r{index}-chaos-{os.getpid()}",
            plan,
            cluster,
        )
        if cluster.armed is not None:  # the search ended before both evaluators were busy at once
            plan.append(("drain", cluster.armed[0]))
    kills = [kill for driver in drivers for kill in driver.kills]
    row["kills"] = kills
    row["kills_by_kind"] = {
        kind: sum(k["kind"] == kind for k in kills) for kind in (*KINDS, "reclaim", "timeout")
    }
    row["drain"] = next((k for k in kills if k["kind"] == "drain"), None)
    row["not_fired"] = [list(step) for step in plan]
    row["driver_runs"] = len(drivers)
    row["leaked"] = sum(len(d.leaked) for d in drivers + twin_drivers)
    row["leaked_titles"] = sorted({t[:60] for d in drivers + twin_drivers for t in d.leaked.values()})
    row["exit_s"] = [round(d.exit_s, 1) for d in drivers]
    row["sampler_calls"] = sampler_calls(chaos_dir)
    row["twin_sampler_calls"] = sampler_calls(twin_dir)
    row["wall_s"], row["twin_wall_s"] = wall_s, twin_s
    if twin_drivers[-1].returncode != 0:
        row.update(
            evaluations=None, same_winner=False, error="twin failed: " + twin_drivers[-1].log_tail[-600:]
        )
    else:
        num_seeds = len(chaos_spec(twin_dir, seed, optimizer, budget)["search"]["ema_decays"]) + 2
        row.update(check_run(chaos_dir / "out", twin_dir / "out", budget, num_seeds, drivers))
    row["passed"] = bool(
        row.get("same_winner")
        and row.get("same_trials")
        and row.get("recorded_once")
        and row.get("all_ok")
        and row["leaked"] == 0
        and not row["not_fired"]
        and row["kills_by_kind"]["timeout"] == 0
    )
    return row


def format_table(rows: list[dict]) -> str:
    """run | events (evaluator/trial/driver/drain) | evaluations | same winner | leaks | wall (chaos / twin)."""
    lines = [
        (
            f"{'run':>3} {'opt':<6} {'events e/t/d/n':>14} {'evals':>5} {'once':>5} {'same trials':>11} "
            f"{'same winner':>11} {'leaks':>5} {'wall s':>7} {'twin s':>7}  passed"
        )
    ]
    for row in rows:
        k = row["kills_by_kind"]
        events = f"{k['evaluator']}/{k['trial']}/{k['driver']}/{k['drain']}"
        lines.append(
            f"{row['run']:>3} {row['optimizer']:<6} {events:>14} "
            f"{row.get('evaluations') or '-':>5} {row.get('recorded_once', False)!s:>5} "
            f"{row.get('same_trials', False)!s:>11} {row.get('same_winner', False)!s:>11} "
            f"{row['leaked']:>5} {row['wall_s']:>7.1f} {row['twin_wall_s']:>7.1f}  {row['passed']}"
        )
    return "\n".join(lines)


def event_lines(rows: list[dict]) -> list[str]:
    """Each run's events as they fired."""
    return [
        f"run {row['run']} (seed {row['seed']}): "
        + ", ".join(
            f"{k['kind']} at {k['at_recorded']} recorded"
            + (f" ({k['busy_at_notice']} evaluators busy at the notice)" if k["kind"] == "drain" else "")
            for k in row["kills"]
        )
        + f"; passed: {row['passed']}"
        for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (optimisers x seeds through the harness); print the table; write the JSON and notes."""
    cli = harness.parser(__doc__, seeds=[0, 1], quick_seeds=[0])
    cli.add_argument(
        "--optimizers", nargs="+", default=None, help="default CMA NGOpt (quick CMA): each runs on every seed"
    )
    cli.add_argument("--budget", type=int, default=None, help="default 14 (quick 10)")
    cli.add_argument("--workdir", default=str(ROOT / "outputs" / "bench" / "chaos_search"))
    args = cli.parse_args(argv)
    optimizers = args.optimizers or (["CMA"] if args.quick else ["CMA", "NGOpt"])
    budget = args.budget or (10 if args.quick else 14)
    base = Path(args.workdir)
    if base.exists():
        import shutil

        shutil.rmtree(base)
    record = harness.run_record(args, evaluator_actors=2, torch_threads_per_evaluator=1)
    done: list[dict] = []

    def measure(optimizer: str, _optimizer: str, seed: int) -> dict:
        row = chaos_run(len(done), seed, optimizer, budget, base)
        done.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        return row

    sweep = harness.Sweep(
        "chaos_search",
        configs={name: name for name in optimizers},
        seeds=harness.chosen_seeds(args),
        measure=measure,
        describe=(
            f"each (optimiser, seed) a chaos search at budget {budget} beside its uninterrupted twin; a pass: the "
            "twin's trials and winner, every evaluation recorded once, no leaked process"
        ),
    )
    rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # each run starts from scratch
    passed = sum(row["passed"] for row in rows)
    print(format_table(rows))
    sweep.extra.update(budget=budget, passed=passed)
    harness.finish(
        sweep,
        args,
        record,
        rows,
        sections=[
            ("Result", f"{passed} of {len(rows)} runs passed at budget {budget}"),
            ("Runs", "```\n" + format_table(rows) + "\n```"),
            ("Events as they fired", event_lines(rows)),
        ],
        title="LCSC search under chaos" + (" (--quick)" if args.quick else ""),
    )
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
