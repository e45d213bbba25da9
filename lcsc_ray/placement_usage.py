"""How much of each node's object store a placed set takes: what `ray memory` reports, per node.

Each alive node's raylet is asked for its object-store statistics (the `GetNodeStats` call `ray memory` makes):
bytes in shared memory, in Ray's disk-backed fallback allocation, primary copies, spilled, and the capacity.
Ray has no public per-node call for these; this is the one place that reaches into `ray._private` for them, so a
Ray upgrade that moves it breaks here and nowhere else. `set_locations` uses the public (experimental)
`get_object_locations` instead: which nodes hold a copy of each object this process owns.
"""

from __future__ import annotations

from collections.abc import Iterable


def object_store_use() -> dict[str, dict[str, int]]:
    """Node id -> {'used', 'fallback', 'primary', 'spilled', 'capacity'} bytes of its object store, for every
    alive node of the connected cluster."""
    import ray
    from ray._private.internal_api import node_stats

    use = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
        store = stats.store_stats
        use[node["NodeID"]] = {
            "used": int(store.object_store_bytes_used),
            "fallback": int(store.object_store_bytes_fallback),
            "primary": int(store.object_store_bytes_primary_copy),
            "spilled": int(store.spilled_bytes_total),
            "capacity": int(store.object_store_bytes_avail),
        }
    return use


def set_locations(refs: Iterable) -> dict[str, int]:
    """Node id -> bytes of the objects `refs` (owned by this process) with a copy on that node."""
    from ray.experimental import get_object_locations

    held: dict[str, int] = {}
    for location in get_object_locations(list(refs), timeout_ms=60_000).values():
        for node in location.get("node_ids") or []:
            held[node] = held.get(node, 0) + int(location.get("object_size") or 0)
    return held
