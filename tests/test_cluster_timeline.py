"""rayops/cluster_timeline.py: node events from two looks at the GCS, the samples kept, the result section, the
plot; and one look at a real GCS."""

from __future__ import annotations

import ray

from rayops.cluster_timeline import ClusterTimeline, NodeState, gcs_node_states, node_events, timeline_png

HEAD = NodeState("aa", "head.on_demand", True)


def spot(node_id: str, alive: bool = True, reason: str = "") -> NodeState:
    return NodeState(node_id, "worker.cpu.spot", alive, reason)


def test_node_events_name_joins_leaves_with_their_reason_and_new_drains():
    before = {"aa": HEAD, "b1": spot("b1"), "b2": spot("b2")}
    now = {"aa": HEAD, "b1": spot("b1", False, "reclaim"), "b2": spot("b2"), "b3": spot("b3")}
    events = node_events(before, now, drains_before=set(), drains={"b2": 1234})
    assert events == [
        {"kind": "leave", "node_id": "b1", "node_type": "worker.cpu.spot", "reason": "reclaim"},
        {"kind": "join", "node_id": "b3", "node_type": "worker.cpu.spot"},
        {"kind": "drain", "node_id": "b2", "node_type": "worker.cpu.spot", "deadline_ms": 1234},
    ]
    assert node_events(now, now, {"b2"}, {"b2": 1234}) == []  # nothing changed: nothing recorded


def test_the_timeline_keeps_a_sample_per_change_and_a_section_only_when_nodes_changed():
    looks = iter(
        [
            [HEAD, spot("b1")],  # the starting point: no join recorded for what is already up
            [HEAD, spot("b1")],
            [HEAD, spot("b1"), spot("b2")],
            [HEAD, spot("b1", False, "reclaim"), spot("b2")],
        ]
    )
    workers, done = iter([1, 1, 2, 1]), iter([0, 0, 3, 5])
    timeline = ClusterTimeline(
        "unused",
        lambda: next(workers),
        lambda: next(done),
        labels=("evaluators", "trials done"),
        node_source=lambda: next(looks),
        drain_source=dict,
    )
    timeline.poll()
    assert timeline.section() is None  # a cluster that did not change adds nothing to a result
    for _ in range(3):
        timeline.poll()
    section = timeline.section()
    assert [(e["kind"], e["node_id"]) for e in section["events"]] == [("join", "b2"), ("leave", "b1")]
    assert section["events"][1]["reason"] == "reclaim"
    assert [(s["nodes"], s["workers"], s["done"]) for s in section["samples"]] == [
        ({"head.on_demand": 1, "worker.cpu.spot": 1}, 1, 0),  # the second look changed nothing: no sample
        ({"head.on_demand": 1, "worker.cpu.spot": 2}, 2, 3),
        ({"head.on_demand": 1, "worker.cpu.spot": 1}, 1, 5),
    ]
    timeline.add_events(
        [{"kind": "reclaim", "node_id": "b1", "node_type": "worker.cpu.spot", "wall_time": 0.0}]
    )
    assert section["done_label"] == "trials done" and "injected-reclaim" in {
        e["kind"] for e in timeline.section()["events"]
    }
    png = timeline_png(timeline.section())
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_one_look_at_a_real_gcs_finds_this_node_alive(ray_local):
    gcs = ray.get_runtime_context().gcs_address
    states = gcs_node_states(gcs)
    assert ray.get_runtime_context().get_node_id() in {s.node_id for s in states if s.alive}
    assert {s.node_type for s in states if s.alive} == {"head"}  # no autoscaler: the head has no node type
