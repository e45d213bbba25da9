"""Checkpoint sets past one node's object store, on a real 3-node Ray on loopback (200 MB object store each).

`sharded`: a set larger than any node's object store is searched with each node holding its share, and a node
killed mid-search loses its shards, which Ray rebuilds from lineage: no evaluation fails, the budget is spent
exactly, each evaluation once. `stream`: a set larger than the whole cluster's object store is searched."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from schemas.loader import dump_spec
from schemas.search import SearchSpec
from tests.multinode import local_cluster
from tests.placement_plugins import write_wide_run

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 8
STORE = 200_000_000  # object store of each node (the workers' too: tests.multinode)
SET_BYTES = 4 * 60_000_000


def _spec(tmp_path: Path, numel: int, placement: str = "auto") -> SearchSpec:
    return SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(tmp_path / "ckpts"), "placement": placement},
            "model": {"target": "tests.placement_plugins:build_wide", "kwargs": {"numel": numel}},
            "sampler": {
                "target": "tests.lcsc_search_plugins:counting_sample",
                "nfe": 2,
                "kwargs": {"log_dir": str(tmp_path), "seconds": 1.0},
            },
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 64,
                "holdout_seeds": [11],
            },
            "evaluators": {
                "num_actors": 2,
                "batch_size": 64,
                "num_cpus": 0.5,
                "evaluation_timeout_s": 300,
            },
            "search": {"budget": BUDGET, "optimizer": "CMA", "ema_decays": [0.5]},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def _search(cluster, spec: SearchSpec, tmp_path: Path, name: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    dump_spec(spec, path)
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "lcsc_ray", "search", str(path)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _store_use(cluster) -> dict[str, int]:
    """Bytes in each alive node's object store (shared memory + fallback), from the raylets' own statistics."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); import ray; "
        f"ray.init(address='{cluster.gcs_address}', logging_level='ERROR'); "
        "from lcsc_ray.placement_usage import object_store_use; "
        "print(json.dumps({n: u['used'] + u['fallback'] for n, u in object_store_use().items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _evaluations(out: Path) -> int:
    return len(list((out / "state" / "evaluations").glob("*.json")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sharded_search_past_one_node_survives_a_lost_node(tmp_path):
    """auto places a 4 x 60 MB set (more than any node's 200 MB object store) as `sharded`; `node` is refused;
    mid-search each node's object store holds about its third of the set; a worker node holding shards is killed
    mid-search and nothing is lost."""
    numel = 15_000_000  # 60 MB per checkpoint
    write_wide_run(tmp_path / "ckpts", num=4, numel=numel)
    # the workers hold shards only (no CPUs: every actor and trial runs on the head, which is never lost)
    with local_cluster([0, 0], head_cpus=2, log_dir=tmp_path, head_object_store=STORE) as cluster:
        node = _spec(tmp_path, numel, "node")
        node = node.model_copy(
            update={"output": node.output.model_copy(update={"uri": str(tmp_path / "node")})}
        )
        refused = _search(cluster, node, tmp_path, "node")
        assert refused.wait(timeout=300) != 0
        assert "checkpoints.placement: sharded" in (tmp_path / "node.log").read_text()
        search = _search(cluster, _spec(tmp_path, numel), tmp_path, "sharded")
        deadline = time.monotonic() + 500
        use: dict[str, int] = {}
        while _evaluations(tmp_path / "out") < 3 and time.monotonic() < deadline:
            assert search.poll() is None, (tmp_path / "sharded.log").read_text()[-4000:]
            if not use and _evaluations(tmp_path / "out") >= 1:
                use = _store_use(cluster)  # mid-search, the set placed: one shard per node
            time.sleep(0.5)
        done_before = _evaluations(tmp_path / "out")
        use = use or _store_use(cluster)
        # each node holds about its third of the 240 MB set (plus what is in flight), none all of it
        assert len(use) == 3 and all(0.2 * SET_BYTES < b < 0.75 * SET_BYTES for b in use.values()), use
        cluster.kill_node(cluster.nodes[2])  # a spot preemption: its shards are gone with it
        returncode = search.wait(timeout=600)
    log = (tmp_path / "sharded.log").read_text()
    assert returncode == 0, log[-4000:]
    assert "checkpoint placement sharded: auto" in log
    assert done_before < BUDGET
    trials = pd.read_parquet(tmp_path / "out" / "trials.parquet")
    assert len(trials[trials.rung == 0]) == BUDGET and (trials.status == "ok").all()
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["num_evaluations"] == BUDGET
    # each evaluation once, at its first attempt: the lost shards were rebuilt under the running combination
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "state" / "evaluations").glob("*.json")]
    assert records and all(r["status"] == "ok" and r["attempts"] == 1 for r in records), records
