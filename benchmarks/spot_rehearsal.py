"""Spot rehearsal, both engines: seeded runs on the local autoscaling spot cluster with seeded spot events, each
against a twin on a fixed cluster of the same peak size.

Each run submits a small job through Ray's Job Submission SDK (as `ray job submit` does):
- **LCSC**: a search of `--budget` evaluations over 5 tiny checkpoints (64-sample FIDs, each evaluation sampling at
  least `--eval-s`), 3 evaluators of 1 CPU (`evaluators.min_actors` 1: the pool follows the nodes); the search's
  seed is the run's seed, and its twin runs once per seed.
- **CheckFree**: `examples/train_spot.yaml` (CheckFree+, 4 stages and a standby of 0.5 CPU on spot workers) for
  `--steps` steps. Its spec seed is fixed, the run's seed only seeds the events; the twin therefore runs on the
  first two seeds only, and the JSON records whether they trained the same losses (the engine is deterministic).

Every spot run goes to ONE `rayops.spot_cluster.LocalSpotCluster` (3 spot workers of 1 CPU at most, launched on
demand), started once and reused: before each run the cluster is back at its minimum (the head). Once the job is
under way (LCSC: 3 workers up and evaluations done; CheckFree: a checkpoint past step 0), a
`rayops.spot_events.SpotEventInjector` plays `plan_spot_events(seed, --events, ..., both_kinds=True)`: reclaims
without notice and PREEMPTION drains with a `--notice-s` deadline. LCSC's events fall in a `--window-s` wall window;
CheckFree's at seeded steps in `--cf-event-span` (one per stratum, injected once that step is checkpointed), so a
training that runs faster than planned still gets every event. Every twin goes to ONE fixed local cluster of
3 one-CPU workers (`tests/multinode.py`), no events.

Per run the JSON records: budget (LCSC) or steps (CheckFree) kept exactly, each once; the same winner as the twin
(LCSC) or the final loss against the twin's (CheckFree); work redone (sampler calls beyond the distinct
evaluations; steps run again after a rollback); the time from each node lost to an event until the pool or the
pipeline was whole again (from the result's `cluster_timeline`); worker node-seconds against the twin's (3 nodes
for the twin's wall time); actors, placement groups and worker nodes left after the job (none); and the time the
cluster took to scale back to its head. Rows are cached (`benchmarks/harness.py`): a killed run resumes.

    .venv/bin/python benchmarks/spot_rehearsal.py [--quick] [--seeds 0 1 2 3 4] [--engines lcsc checkfree]

It writes benchmarks/results/spot_rehearsal.json and .md, and the timeline plot of one run of each engine
(spot_rehearsal_<engine>_timeline.png); --quick: seed 0 only, under outputs/bench/quick/.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a run without PYTHONPATH

from _common import ROOT, markdown_table, write_markdown
from harness import ROWS, Sweep, cached_rows, finish, parser, results_dir, run_record, run_sweep

from rayops.cluster_nodes import alive_node_ids, autoscaler_nodes, wait_until, worker_nodes
from rayops.resources import AUTOSCALING_ENV
from rayops.spot_cluster import LocalSpotCluster
from rayops.spot_events import DRAIN, RECLAIM, SpotEventInjector, plan_spot_events
from schemas.loader import dump_spec, load_spec

NAME = "spot_rehearsal"
PEAK_WORKERS = 3  # the spot cluster's most workers (1 CPU each) and the fixed twin's size
CF_SPEC_SEED = (
    0  # CheckFree's model and data seed, the same in every run: the run's seed seeds the events only
)
CF_TWIN_RUNS = 2  # CheckFree twins: on the first seeds only (the same spec each time)
JOB_TIMEOUT_S = 1800.0
GONE_TIMEOUT_S = 120.0  # a finished job's actors and placement groups are gone within this
SCALE_BACK_TIMEOUT_S = 300.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
WORK = ROOT / "outputs" / "bench" / NAME  # each run's output (git-ignored); a rerun of a row starts it afresh


# ----- the two clusters, each started once ------------------------------------------------------------------
class Clusters:
    """The spot cluster and the fixed twin cluster, each started on first use and kept for every run."""

    def __init__(self, idle_timeout_s: float):
        self.idle_timeout_s = idle_timeout_s
        self._stack = ExitStack()
        self._spot: LocalSpotCluster | None = None
        self._fixed = None

    def spot(self) -> LocalSpotCluster:
        if self._spot is None:
            cluster = LocalSpotCluster(max_workers=PEAK_WORKERS, idle_timeout_s=self.idle_timeout_s)
            self._spot = self._stack.enter_context(cluster)
        return self._spot

    def fixed(self):
        if self._fixed is None:
            from tests.multinode import local_cluster

            logs = WORK / "fixed-ray-logs"
            logs.mkdir(parents=True, exist_ok=True)
            cluster = self._stack.enter_context(local_cluster([1] * PEAK_WORKERS, head_cpus=0, log_dir=logs))
            cluster.wait_for_nodes(PEAK_WORKERS + 1)
            self._fixed = cluster
        return self._fixed

    def close(self) -> None:
        self._stack.close()


# ----- the jobs ---------------------------------------------------------------------------------------------
def lcsc_spec(workdir: Path, args, seed: int):
    """The search: tiny plug-ins from tests/, a sampler that logs each call and takes `eval_s`."""
    from tests.test_lcsc_search import tiny_spec

    (workdir / "log").mkdir(parents=True, exist_ok=True)
    spec = tiny_spec(
        workdir,
        budget=args.budget,
        sampler={
            "target": "tests.lcsc_search_plugins:counting_sample",
            "nfe": 2,
            "kwargs": {"log_dir": str(workdir / "log"), "seconds": args.eval_s},
        },
    )
    spec.seed = seed
    spec.evaluators = spec.evaluators.model_copy(
        update={"num_actors": PEAK_WORKERS, "min_actors": 1, "num_cpus": 1.0}
    )
    return spec


def checkfree_spec(workdir: Path, args, twin: bool):
    """examples/train_spot.yaml for `--steps` steps; the twin's stages may go to any worker of the fixed cluster
    (whose workers carry no spot label or resource; its head takes no work either way)."""
    from schemas.train import TrainSpec

    spec = load_spec(ROOT / "examples" / "train_spot.yaml", TrainSpec)
    pipeline = (
        spec.pipeline.model_copy(update={"node_labels": {}, "node_resources": {}}) if twin else spec.pipeline
    )
    return spec.model_copy(
        update={
            "seed": CF_SPEC_SEED,
            "steps": args.steps,
            "eval_every": args.steps,
            "pipeline": pipeline,
            "checkpointing": spec.checkpointing.model_copy(update={"every": args.checkpoint_every}),
            "output": spec.output.model_copy(update={"uri": str(workdir / "out")}),
        }
    )


def entrypoint(engine: str, spec_path: Path) -> str:
    return (
        f"{sys.executable} -m lcsc_ray search {spec_path}"
        if engine == "lcsc"
        else f"{sys.executable} -m checkfree_ray train {spec_path}"
    )


def submit_and_wait(dashboard_url: str, engine: str, spec, job_dir: Path, autoscales: bool) -> dict:
    """Submit the job as `ray job submit` does and wait for it to end: its status, logs and wall time."""
    from ray.job_submission import JobSubmissionClient

    job_dir.mkdir(parents=True, exist_ok=True)
    dump_spec(spec, job_dir / "spec.yaml")
    client = JobSubmissionClient(dashboard_url)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", AUTOSCALING_ENV: "1" if autoscales else "0"}
    began = time.monotonic()
    # no working_dir: on a local cluster the nodes share one session dir, where a node's runtime-env agent can
    # delete an unused working_dir package under the job's running driver
    job_id = client.submit_job(
        entrypoint=entrypoint(engine, job_dir / "spec.yaml"), runtime_env={"env_vars": env}
    )
    try:
        wait_until(lambda: str(client.get_job_status(job_id)) in TERMINAL, JOB_TIMEOUT_S, f"the {engine} job")
    finally:
        if str(client.get_job_status(job_id)) not in TERMINAL:
            client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    (job_dir / "job.log").write_text(logs)
    return {"status": str(client.get_job_status(job_id)), "wall_s": time.monotonic() - began, "logs": logs}


# ----- what a finished job recorded -------------------------------------------------------------------------
def lcsc_facts(spec, workdir: Path, budget: int, logs: str) -> dict:
    """Budget kept, the winner, evaluations and sampler calls; the timeline plot saved beside the run."""
    from lcsc_ray.report import load_result
    from rayops import artifacts

    result = load_result(spec.output.uri)
    timeline = result.cluster_timeline or {}
    manifest = artifacts.read_manifest(spec.output.uri)
    if "cluster_timeline.png" in manifest["files"]:
        png = artifacts.read_artifact_file(spec.output.uri, "cluster_timeline.png", manifest)
        (workdir / "cluster_timeline.png").write_bytes(png)
    calls_log = workdir / "log" / "calls.log"
    calls = len(calls_log.read_text().splitlines()) if calls_log.exists() else 0
    distinct = timeline["samples"][-1]["done"] if timeline.get("samples") else result.num_evaluations
    return {
        "num_evaluations": result.num_evaluations,
        "num_failed": result.num_failed,
        "kept": result.num_evaluations == budget and result.num_failed == 0,
        "winner": [round(a, 12) for a in result.best.coefficients],
        "winner_fid": result.best.fid,
        "sampler_calls": calls,
        "redone": calls - distinct if timeline.get("samples") else None,  # beyond the evaluations done
        "node_losses_not_counted": logs.count("lost with its node"),
        "replacements_counted": logs.count("; replacement "),  # healing's log line per counted replacement
        "timeline": timeline,
    }


def checkfree_facts(workdir: Path, steps: int) -> dict:
    """Steps kept exactly once, the final losses, steps redone, failures and hand-offs by kind."""
    from schemas.train_result import TrainResult

    out = workdir / "out"
    result = TrainResult.model_validate_json((out / "result.json").read_text())
    if (out / "cluster_timeline.png").exists():
        shutil.copyfile(out / "cluster_timeline.png", workdir / "cluster_timeline.png")
    kept = [(s, loss) for s, loss, gone in zip(result.steps, result.losses, result.rolled_back) if not gone]
    events = result.node_events
    return {
        "kept": [s for s, _ in kept] == list(range(1, steps + 1)),
        "final_loss": kept[-1][1] if kept else None,
        "final_val_loss": result.final_val_loss,
        "redone": sum(result.rolled_back),
        "failures": sorted(f"{f.method}/{f.reason}" for f in result.failures),
        "handoffs": sum(e["kind"] == "handoff" for e in events),
        "handoffs_failed": sum(e["kind"] == "handoff_failed" for e in events),
        "stage_whole_after_s": [round(e["whole_after_s"], 1) for e in events if e["kind"] == "stage_rebuilt"],
        "median_step_s": result.median_step_s,
        "timeline": result.cluster_timeline or {},
    }


def leftovers(dashboard_url: str) -> dict:
    """The cluster's alive actors (the job server's own supervisor aside) and placement groups not removed,
    once they had `GONE_TIMEOUT_S` to go after the job."""
    from ray.util.state import list_actors, list_placement_groups

    def probe() -> dict:
        actors = list_actors(
            address=dashboard_url,
            limit=10000,
            filters=[("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        groups = list_placement_groups(address=dashboard_url, limit=10000, raise_on_missing_output=False)
        return {
            "actors": sorted(a.class_name for a in actors if a.class_name != "JobSupervisor"),
            "placement_groups": [g.placement_group_id for g in groups if g.state != "REMOVED"],
        }

    try:
        return wait_until(
            lambda: (found := probe()) and not any(found.values()) and found, GONE_TIMEOUT_S, ""
        )
    except TimeoutError:
        return probe()


# ----- one spot run, one twin -------------------------------------------------------------------------------
def under_way(engine: str, gcs: str, workdir: Path) -> bool:
    """The job is running on its nodes: LCSC with all 3 workers up and 3 evaluations sampled, CheckFree past its
    first checkpoint after step 0."""
    if engine == "lcsc":
        calls = workdir / "log" / "calls.log"
        return (
            len(worker_nodes(gcs)) >= PEAK_WORKERS
            and calls.exists()
            and len(calls.read_text().splitlines()) >= 3
        )
    return checkpointed_step(workdir) > 0


def checkpointed_step(workdir: Path) -> int:
    """CheckFree: the step of the training's latest checkpoint (0 before the first after step 0)."""
    manifests = (workdir / "out").glob("checkpoints/run-*/checkpoint_*/MANIFEST.json")
    return max((int(p.parent.name.split("_")[-1]) for p in manifests), default=0)


def event_steps(plan: list, steps: int, span: tuple[float, float]) -> list[int]:
    """CheckFree: the step at which each planned event is injected. The span [span[0], span[1]) of the training's
    steps is cut into one stratum per event; event i falls in the middle 60% of stratum i at the place its drawn
    moment (a fraction of the plan's window) gives, so events keep at least 40% of a stratum between them and every
    event lands while the job still runs (timed by steps, not by a wall window the job may end before)."""
    lo, hi = span[0] * steps, span[1] * steps
    width = (hi - lo) / max(1, len(plan))
    return [int(lo + width * (i + 0.2 + 0.6 * planned.at_s)) for i, planned in enumerate(plan)]


def inject_at_steps(injector, plan: list, at_steps: list[int], workdir: Path, stop: threading.Event) -> None:
    """Inject each planned event once the training has checkpointed its step (until `stop` is set)."""
    for planned, step in zip(plan, at_steps, strict=True):
        while not stop.is_set() and checkpointed_step(workdir) < step:
            stop.wait(0.5)
        if stop.is_set():
            return
        injector.inject(planned)


def fresh_workdir(engine: str, kind: str, seed: int, quick: bool) -> Path:
    workdir = WORK / ("quick" if quick else "full") / f"{engine}-{kind}-{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def job_facts(engine: str, spec, workdir: Path, args, job: dict) -> dict:
    """What a finished job kept and did, read from its output: the search's or the training's facts."""
    if engine == "lcsc":
        return lcsc_facts(spec, workdir, args.budget, job["logs"])
    return checkfree_facts(workdir, args.steps)


def spot_run(engine: str, seed: int, args, clusters: Clusters) -> dict:
    """One job on the spot cluster with the seeded events; then what was left and the scale-back."""
    cluster = clusters.spot()
    gcs, dashboard = cluster.address.gcs_address, cluster.address.dashboard_url
    head = {node.node_id for node in autoscaler_nodes(gcs) if node.is_head}
    began = time.monotonic()
    wait_until(
        lambda: alive_node_ids(gcs) == head, SCALE_BACK_TIMEOUT_S, "the cluster at its head before the run"
    )
    waited_for_minimum_s = time.monotonic() - began
    workdir = fresh_workdir(engine, "spot", seed, args.quick)
    spec = lcsc_spec(workdir, args, seed) if engine == "lcsc" else checkfree_spec(workdir, args, twin=False)
    injector = SpotEventInjector(gcs, cluster.temp_dir)
    stop = threading.Event()
    # LCSC: moments in a wall window once under way; CheckFree: fractions of the window mapped to steps done
    window = args.window_s if engine == "lcsc" else 1.0
    plan = plan_spot_events(seed, args.events, window, args.notice_s, both_kinds=True)
    at_steps = event_steps(plan, args.steps, tuple(args.cf_event_span)) if engine == "checkfree" else None

    def chaos() -> None:
        try:
            wait_until(
                lambda: stop.is_set() or under_way(engine, gcs, workdir), JOB_TIMEOUT_S, "the job under way"
            )
        except TimeoutError:
            return
        if stop.is_set():
            return
        if at_steps is None:
            injector.run(plan, stop)
        else:
            inject_at_steps(injector, plan, at_steps, workdir, stop)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        job = submit_and_wait(dashboard, engine, spec, workdir / "job", autoscales=True)
    finally:
        stop.set()
        thread.join(timeout=60)
    try:
        injector.wait_for_terminations(args.notice_s + 60)  # a drained node is killed at its deadline
    except TimeoutError:
        injector.cancel()
    left = leftovers(dashboard)
    began = time.monotonic()
    try:
        wait_until(lambda: alive_node_ids(gcs) == head, SCALE_BACK_TIMEOUT_S, "the cluster to scale back")
        scale_back_s: float | None = round(time.monotonic() - began, 1)
    except TimeoutError:
        scale_back_s = None
    ok = job["status"] == "SUCCEEDED"
    facts = job_facts(engine, spec, workdir, args, job) if ok else {}
    events = injector.timeline()
    return {
        "job_status": job["status"],
        "error_tail": None if ok else job["logs"][-3000:],
        "wall_s": round(job["wall_s"], 1),
        "waited_for_minimum_s": round(waited_for_minimum_s, 1),
        "plan": [
            {"at_step": at_steps[i]} | {"kind": p.kind}
            if at_steps
            else {"at_s": round(p.at_s, 1), "kind": p.kind}
            for i, p in enumerate(plan)
        ],
        "events": events,
        "reclaims": sum(e["kind"] == RECLAIM for e in events),
        "drains": sum(e["kind"] == DRAIN for e in events),
        "leaked_actors": left["actors"],
        "leaked_placement_groups": left["placement_groups"],
        "scale_back_s": scale_back_s,
        "leaked_worker_nodes": len(alive_node_ids(gcs) - head),
        "workdir": str(workdir.relative_to(ROOT)),
        **facts,
    }


def twin_run(engine: str, seed: int, args, clusters: Clusters) -> dict:
    """The same job on the fixed cluster of the spot cluster's peak size (3 workers of 1 CPU), no events."""
    cluster = clusters.fixed()
    workdir = fresh_workdir(engine, "twin", seed, args.quick)
    spec = lcsc_spec(workdir, args, seed) if engine == "lcsc" else checkfree_spec(workdir, args, twin=True)
    job = submit_and_wait(cluster.dashboard_url, engine, spec, workdir / "job", autoscales=False)
    ok = job["status"] == "SUCCEEDED"
    facts = job_facts(engine, spec, workdir, args, job) if ok else {}
    facts.pop("timeline", None)
    left = leftovers(cluster.dashboard_url)
    return {
        "job_status": job["status"],
        "error_tail": None if ok else job["logs"][-3000:],
        "wall_s": round(job["wall_s"], 1),
        "leaked_actors": left["actors"],
        "leaked_placement_groups": left["placement_groups"],
        **facts,
    }


# ----- comparison -------------------------------------------------------------------------------------------
def whole_again_s(timeline: dict, hit: list[str]) -> list[float | None]:
    """Seconds from each node hit by an event (its drain, or its leave) until the pool or pipeline was back at its
    peak size (None: not before the job ended)."""
    samples = timeline.get("samples", [])
    peak = max((s["workers"] for s in samples), default=0)
    out = []
    for node_id in hit:
        losses = [
            e["t_s"]
            for e in timeline.get("events", [])
            if e.get("node_id") == node_id and e["kind"] in ("drain", "leave")
        ]
        if not losses:
            continue
        later = [s["t_s"] for s in samples if s["t_s"] > min(losses) and s["workers"] >= peak]
        out.append(round(later[0] - min(losses), 1) if later else None)
    return out


def worker_node_seconds(timeline: dict, end_s: float) -> float:
    """Worker nodes (every type but the head) integrated over the job's timeline."""
    samples = timeline.get("samples", [])
    total = 0.0
    for sample, following in zip(samples, [*samples[1:], None]):
        until = following["t_s"] if following else max(end_s, sample["t_s"])
        workers = sum(n for node_type, n in sample["nodes"].items() if "head" not in node_type)
        total += workers * max(0.0, until - sample["t_s"])
    return round(total, 1)


def compare(engine: str, spot_row: dict, twin_row: dict | None) -> dict:
    """One run of the JSON: the spot run against its twin (None where no twin ran or it failed)."""
    spot = dict(spot_row)
    timeline = spot.pop("timeline", {})
    twin_ok = twin_row is not None and twin_row.get("job_status") == "SUCCEEDED"
    hit = [e["node_id"] for e in spot.get("events", []) if e["kind"] in (RECLAIM, DRAIN)]
    node_s = (
        worker_node_seconds(timeline, timeline["samples"][-1]["t_s"]) if timeline.get("samples") else None
    )
    twin_node_s = round(PEAK_WORKERS * twin_row["wall_s"], 1) if twin_ok else None
    run = {
        "seed": spot_row["seed"],
        "job_status": spot["job_status"],
        "kept_exactly_once": bool(spot.get("kept")),
        "events": len(hit),
        "both_kinds": spot.get("reclaims", 0) > 0 and spot.get("drains", 0) > 0,
        "redone": spot.get("redone"),
        "whole_again_s": whole_again_s(timeline, hit),
        "worker_node_s": node_s,
        "twin_worker_node_s": twin_node_s,
        "node_s_vs_twin": round(node_s / twin_node_s, 3) if node_s and twin_node_s else None,
        "wall_s": spot["wall_s"],
        "twin_wall_s": twin_row["wall_s"] if twin_ok else None,
        "leaked": {
            "actors": len(spot.get("leaked_actors", [])),
            "placement_groups": len(spot.get("leaked_placement_groups", [])),
            "worker_nodes": spot.get("leaked_worker_nodes"),
        },
        "scaled_back_to_head_s": spot.get("scale_back_s"),
        "twin_seed": twin_row["seed"] if twin_row else None,
    }
    if engine == "lcsc":
        run["same_winner_as_twin"] = (
            spot.get("winner") == twin_row.get("winner") if twin_ok and "winner" in spot else None
        )
        # sampler calls beyond the twin's (the same seeded search without a loss): the evaluations run again
        run["evaluations_redone"] = (
            spot["sampler_calls"] - twin_row["sampler_calls"]
            if twin_ok and "sampler_calls" in spot and "sampler_calls" in twin_row
            else run["redone"]
        )
        del run["redone"]
    else:
        loss, twin_loss = spot.get("final_loss"), twin_row.get("final_loss") if twin_ok else None
        run["final_loss"], run["twin_final_loss"] = loss, twin_loss
        run["final_loss_minus_twin"] = (
            loss - twin_loss if loss is not None and twin_loss is not None else None
        )
        run["steps_redone"] = run.pop("redone")
    run["spot"] = spot
    run["twin"] = twin_row
    run["cluster_timeline"] = timeline
    return run


def summary(engine: str, runs: list[dict], twins: list[dict]) -> dict:
    """The engine's runs in numbers."""
    done = [r for r in runs if r["job_status"] == "SUCCEEDED"]
    whole = [w for r in runs for w in r["whole_again_s"] if w is not None]
    ratios = [r["node_s_vs_twin"] for r in runs if r["node_s_vs_twin"] is not None]
    out = {
        "runs": len(runs),
        "succeeded": len(done),
        "kept_exactly_once": sum(r["kept_exactly_once"] for r in runs),
        "events": sum(r["events"] for r in runs),
        "min_events_per_run": min((r["events"] for r in runs), default=0),
        "runs_with_both_kinds": sum(r["both_kinds"] for r in runs),
        "whole_again_s_median": statistics.median(whole) if whole else None,
        "whole_again_s_max": max(whole) if whole else None,
        "losses_not_whole_again_before_the_end": sum(w is None for r in runs for w in r["whole_again_s"]),
        "node_s_vs_twin_median": statistics.median(ratios) if ratios else None,
        "leaked_total": sum(sum(v or 0 for v in r["leaked"].values()) for r in runs)
        + sum(len(t.get("leaked_actors", [])) + len(t.get("leaked_placement_groups", [])) for t in twins),
        "scaled_back_to_head": sum(r["scaled_back_to_head_s"] is not None for r in runs),
        "twins": len(twins),
        "twins_succeeded": sum(t.get("job_status") == "SUCCEEDED" for t in twins),
    }
    if engine == "lcsc":
        out["same_winner_as_twin"] = sum(r["same_winner_as_twin"] is True for r in runs)
        out["evaluations_redone_total"] = sum(r["evaluations_redone"] or 0 for r in runs)
    else:
        losses = {t.get("final_loss") for t in twins if t.get("job_status") == "SUCCEEDED"}
        out["twin_final_losses_identical"] = len(losses) == 1 if losses else None
        out["steps_redone_total"] = sum(r["steps_redone"] or 0 for r in runs)
        diffs = [abs(r["final_loss_minus_twin"]) for r in runs if r["final_loss_minus_twin"] is not None]
        out["final_loss_abs_diff_max"] = max(diffs) if diffs else None
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v, digits) for v in value) or "-"
    return str(value)


def engine_table(engine: str, runs: list[dict]) -> str:
    """The engine's runs as a Markdown table."""
    versus = "same winner as twin" if engine == "lcsc" else "final loss (twin)"
    header = ["seed", "job", "kept exactly once", versus, "events (R/D)", "redone", "whole again after loss (s)",
              "node-s (twin)", "leaked actors/PGs/nodes", "scaled back (s)"]  # fmt: skip
    rows = []
    for r in runs:
        spot = r["spot"]
        vs = (
            _fmt(r["same_winner_as_twin"])
            if engine == "lcsc"
            else f"{_fmt(r['final_loss'], 4)} ({_fmt(r['twin_final_loss'], 4)})"
        )
        redone = r["evaluations_redone"] if engine == "lcsc" else r["steps_redone"]
        leaked = r["leaked"]
        rows.append(
            [
                r["seed"],
                r["job_status"],
                r["kept_exactly_once"],
                vs,
                f"{r['events']} ({spot.get('reclaims', 0)}/{spot.get('drains', 0)})",
                _fmt(redone),
                _fmt(r["whole_again_s"]),
                f"{_fmt(r['worker_node_s'], 0)} ({_fmt(r['twin_worker_node_s'], 0)})",
                f"{leaked['actors']}/{leaked['placement_groups']}/{leaked['worker_nodes']}",
                _fmt(r["scaled_back_to_head_s"]),
            ]
        )
    return markdown_table(header, rows)


def notes(engine: str, s: dict) -> list[str]:
    """Notes from the measured values."""
    out = [
        f"{s['succeeded']} of {s['runs']} runs succeeded; {s['kept_exactly_once']} kept their "
        + (
            "budget exactly (each candidate once, none failed)"
            if engine == "lcsc"
            else "steps exactly, each once"
        )
        + f"; {s['events']} spot events in all, at least {s['min_events_per_run']} per run, both kinds in "
        f"{s['runs_with_both_kinds']} runs.",
        (
            f"Whole again after a loss: median {_fmt(s['whole_again_s_median'])} s, at most "
            f"{_fmt(s['whole_again_s_max'])} s; {s['losses_not_whole_again_before_the_end']} loss(es) not whole again "
            "before the job ended (a node lost near the end is not replaced for the little work left)."
        ),
        f"Worker node-seconds against the fixed twin's: median {_fmt(s['node_s_vs_twin_median'], 2)} x.",
        (
            f"Leaked actors, placement groups and nodes: {s['leaked_total']}; the cluster scaled back to its head after "
            f"{s['scaled_back_to_head']} of {s['runs']} runs."
        ),
    ]
    if engine == "lcsc":
        out.append(
            f"Same winner as the twin in {s['same_winner_as_twin']} of {s['runs']} runs ({s['twins_succeeded']} "
            f"twins ran); evaluations redone in all: {s['evaluations_redone_total']}."
        )
    else:
        out.append(
            f"{s['twins_succeeded']} twin(s) ran (the same spec each time); identical final losses: "
            f"{s['twin_final_losses_identical']}. Steps redone in all: {s['steps_redone_total']}; final loss at most "
            f"{_fmt(s['final_loss_abs_diff_max'], 4)} from the twin's (a rebuilt stage's weights differ)."
        )
    return out


# ----- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], seeds=[0, 1, 2, 3, 4], quick_seeds=[0])
    p.add_argument("--engines", nargs="+", default=["lcsc", "checkfree"], choices=["lcsc", "checkfree"])
    p.add_argument("--events", type=int, default=3, help="spot events per run (both kinds)")
    p.add_argument("--budget", type=int, default=30, help="LCSC: evaluations")
    p.add_argument(
        "--eval-s", type=float, default=2.0, help="LCSC: each evaluation samples at least this long"
    )
    p.add_argument("--steps", type=int, default=600, help="CheckFree: training steps")
    p.add_argument("--checkpoint-every", type=int, default=20, help="CheckFree: steps between checkpoints")
    p.add_argument(
        "--window-s", type=float, default=50.0, help="LCSC: events fall in this window once under way"
    )
    p.add_argument(
        "--cf-event-span",
        type=float,
        nargs=2,
        default=[0.05, 0.8],
        help="CheckFree: events fall at steps in this span (fractions of --steps), one per stratum",
    )
    p.add_argument("--notice-s", type=float, default=20.0, help="a drain's deadline")
    p.add_argument("--idle-timeout-s", type=float, default=10.0)
    args = p.parse_args(argv)
    seeds = list(args.seeds) if args.seeds else (args.quick_seeds if args.quick else args.default_seeds)
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:  # once here: each row below is its own small sweep on the one rows file
        (ROWS / ("quick" if args.quick else "full") / f"{NAME}.rows.jsonl").unlink(missing_ok=True)
    clusters = Clusters(args.idle_timeout_s)
    record = run_record(args)

    def measure(name: str, _config: object, seed: int) -> dict:
        engine, kind = name.split("_")
        return (spot_run if kind == "spot" else twin_run)(engine, seed, args, clusters)

    # each config holds the settings its runs depend on, so a cached row measured with others is measured again
    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("default_seeds", "quick_seeds", "seeds", "fresh", "engines")
    }
    configs = {f"{engine}_{kind}": settings for engine in args.engines for kind in ("spot", "twin")}
    sweep = Sweep(NAME, configs=configs, seeds=seeds, measure=measure)
    cf_twin_seeds = seeds[:CF_TWIN_RUNS]
    try:
        for seed in seeds:
            for name, config in configs.items():
                if name == "checkfree_twin" and seed not in cf_twin_seeds:
                    continue
                run_sweep(
                    Sweep(NAME, configs={name: config}, seeds=[seed], measure=measure),
                    out,
                    fresh=False,
                )
    finally:
        clusters.close()
    rows = cached_rows(sweep, out)
    runs, summaries, sections = {}, {}, []
    for engine in args.engines:
        twins = {seed: rows[(f"{engine}_twin", seed)] for seed in seeds if (f"{engine}_twin", seed) in rows}
        runs[engine] = []
        for seed in seeds:
            if (f"{engine}_spot", seed) not in rows:
                continue
            twin = twins.get(seed) if engine == "lcsc" else next(iter(twins.values()), None)
            runs[engine].append(compare(engine, rows[(f"{engine}_spot", seed)], twin))
        summaries[engine] = summary(engine, runs[engine], list(twins.values()))
        title = "LCSC search" if engine == "lcsc" else "CheckFree training"
        sections.append(
            (f"{title}: runs on the spot cluster against the fixed twin", engine_table(engine, runs[engine]))
        )
        sections.append((f"{title}: notes", notes(engine, summaries[engine])))
        png = next(
            (
                ROOT / r["spot"]["workdir"] / "cluster_timeline.png"
                for r in runs[engine]
                if r["kept_exactly_once"] and (ROOT / r["spot"]["workdir"] / "cluster_timeline.png").exists()
            ),
            None,
        )
        if png is not None:
            shutil.copyfile(png, out / f"{NAME}_{engine}_timeline.png")
    describe = (
        f"Per engine, seeded runs on one local autoscaling spot cluster ({PEAK_WORKERS} spot workers of 1 CPU at "
        f"most, idle timeout {args.idle_timeout_s:g} s), {args.events} spot events each (reclaims without notice and "
        f"PREEMPTION drains with a {args.notice_s:g} s deadline; LCSC's in a {args.window_s:g} s window once the job "
        f"is under way, CheckFree's at seeded steps between {args.cf_event_span[0]:g} and {args.cf_event_span[1]:g} "
        f"of the training, one per stratum), against a twin on one fixed cluster of {PEAK_WORKERS} one-CPU workers. LCSC: {args.budget} "
        f"evaluations of at least {args.eval_s:g} s on {PEAK_WORKERS} evaluators, the search seeded by the run, a "
        f"twin per seed. CheckFree: examples/train_spot.yaml (CheckFree+, 4 stages) for {args.steps} steps, the same "
        f"spec seed in every run (the run's seed seeds the events), twins on the first {CF_TWIN_RUNS} seeds."
    )
    final = Sweep(NAME, configs=configs, seeds=seeds, measure=measure, describe=describe,
                  extra={"args": {k: v for k, v in vars(args).items() if k not in ("default_seeds", "quick_seeds")},
                         "summary": summaries, "runs": runs})  # fmt: skip
    finish(final, args, record, [rows[key] for key in sorted(rows, key=lambda k: (k[1], k[0]))])
    sections.insert(0, ("What is measured", describe))
    write_markdown(
        out / f"{NAME}.md", "Spot rehearsal: both engines on a local autoscaling spot cluster", sections
    )
    for engine, s in summaries.items():
        print(engine, s, flush=True)
    good = all(
        s["succeeded"] == s["runs"] == s["kept_exactly_once"] and s["leaked_total"] == 0
        for s in summaries.values()
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
