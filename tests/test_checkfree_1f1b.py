"""The 1F1B schedule: its order, its memory bound, the same losses and weights as GPipe, and failures under it."""

from __future__ import annotations

import pytest
import ray
import torch

from checkfree_ray.executor import PipelineExecutor
from checkfree_ray.model import ModelConfig, ReferenceTrainer
from checkfree_ray.pipeline_schedules import gpipe_order, one_f_one_b_order, peak_held, step_order
from checkfree_ray.recovery_rules import micro_batch_order, route
from tests.test_checkfree_engine import run_steps, tiny_spec
from tests.test_checkfree_phases import fail_at

pytestmark = pytest.mark.timeout(240)


def _routes(strategy: str, stages: int, micro_batches: int) -> list:
    return [route(micro_batch_order(strategy, stages, mb), stages) for mb in range(micro_batches)]


def _per_stage(order, routes, stages: int) -> list[str]:
    return [
        " ".join(f"{kind[0].upper()}{mb}" for kind, mb, hop in order if routes[mb][hop][0] == stage)
        for stage in range(stages)
    ]


def test_1f1b_order_is_the_textbook_warm_up_steady_cool_down():
    """4 stages, 6 micro-batches: stage s runs 3-s warm-up forwards, alternates F/B, then cools down (PipeDream-Flush)."""
    routes = _routes("checkfree", 4, 6)
    assert _per_stage(one_f_one_b_order(routes, 4), routes, 4) == [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5",
    ]


@pytest.mark.parametrize(
    "strategy,stages,micro_batches",
    [("checkfree", 4, 8), ("checkfree+", 4, 8), ("checkfree+", 2, 6), ("checkfree", 3, 2)],
)
def test_1f1b_holds_at_most_s_minus_s_micro_batches_and_runs_every_op_once(strategy, stages, micro_batches):
    """Every op appears once, each after the op it consumes; stage s holds <= S-s micro-batches (GPipe holds M)."""
    routes = _routes(strategy, stages, micro_batches)
    order = one_f_one_b_order(routes, stages)
    assert sorted(order) == sorted(gpipe_order(routes))
    done = set()
    for kind, mb, hop in order:
        needs = (
            ("forward", mb, hop - 1)
            if kind == "forward"
            else (("forward", mb, hop) if hop == len(routes[mb]) - 1 else ("backward", mb, hop + 1))
        )
        assert kind == "forward" and hop == 0 or needs in done, (kind, mb, hop)
        done.add((kind, mb, hop))
    assert all(peak <= stages - s for s, peak in enumerate(peak_held(order, routes, stages)))
    assert peak_held(gpipe_order(routes), routes, stages) == [micro_batches] * stages
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zigzag'"):
        step_order("zigzag", routes, stages)


def _train_in_process(spec, steps: int) -> tuple[list[float], list[dict], list[int]]:
    """Stage workers in this process, driven op by op in `spec.pipeline.schedule`'s order (what the executor
    submits to Ray); returns the losses, the stage states and each stage's most micro-batches held at once."""
    from checkfree_ray.data import make_corpus
    from checkfree_ray.model import ModelConfig
    from checkfree_ray.stage import StageWorker, initial_states

    cfg, S = ModelConfig.from_train_spec(spec), spec.pipeline.num_stages
    workers = [StageWorker(cfg, spec.optim.grad_clip, spec.optim.weight_decay) for _ in range(S)]
    for i, (worker, state) in enumerate(zip(workers, initial_states(spec, cfg))):
        worker.configure(i, spec.optim.lr, state)
    corpus, losses = make_corpus(spec.data, spec.model.seq_len, spec.seed), []
    for step in range(1, steps + 1):
        inputs, targets = corpus.train_batch(
            step, spec.pipeline.micro_batches, spec.pipeline.micro_batch_size
        )
        M, routes = inputs.shape[0], _routes(spec.recovery.strategy, S, inputs.shape[0])
        out: dict = {}
        for kind, mb, hop in step_order(spec.pipeline.schedule, routes, S):
            stage, parts = routes[mb][hop]
            last = hop == len(routes[mb]) - 1
            if kind == "forward":
                x = out[("forward", mb, hop - 1)] if hop else inputs[mb].numpy()
                out[(kind, mb, hop)] = workers[stage].forward(
                    mb, hop, parts, x, targets[mb].numpy() if last else None, 1.0 / M
                )
            else:
                out[(kind, mb, hop)] = workers[stage].backward(
                    mb, hop, None if last else out[("backward", mb, hop + 1)]
                )
        losses.append(sum(out[("forward", mb, len(r) - 1)] for mb, r in enumerate(routes)) / M)
        for worker in workers:
            worker.step()
    return losses, [w.get_state() for w in workers], [w.cache_peak() for w in workers]


@pytest.mark.parametrize("strategy", ["checkfree", "checkfree+"])
def test_1f1b_gives_gpipes_losses_and_weights_while_holding_fewer_activations(strategy):
    """Same spec, 8 micro-batches on 4 stages, 3 steps: 1F1B's losses equal GPipe's to 1e-6 and every stage weight
    is equal; the stages held 8 micro-batches' activations at once under GPipe, at most 4-s under 1F1B."""
    gpipe = _train_in_process(tiny_spec(strategy, pipeline={"micro_batches": 8}), 3)
    one_f_one_b = _train_in_process(tiny_spec(strategy, pipeline={"micro_batches": 8, "schedule": "1f1b"}), 3)
    assert one_f_one_b[0] == pytest.approx(gpipe[0], abs=1e-6)
    assert len(set(gpipe[0])) == 3  # the model trains: three different losses
    for got, expected in zip(one_f_one_b[1], gpipe[1]):
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert gpipe[2] == [8, 8, 8, 8]
    assert all(peak <= 4 - s for s, peak in enumerate(one_f_one_b[2]))
    if strategy == "checkfree":
        assert one_f_one_b[2] == [4, 3, 2, 1]


def test_1f1b_on_ray_equals_single_process_training_and_bounds_real_activations(ray_local):
    """The executor under 1F1B on real stage actors (Ray runs each stage's calls in submission order): 2 steps equal
    single-process training to 1e-6, and the actors held at most 4-s micro-batches (8 under GPipe)."""
    spec = tiny_spec("checkfree", pipeline={"micro_batches": 8, "schedule": "1f1b"})
    reference = ReferenceTrainer(ModelConfig.from_spec(spec.model, 4), spec.seed, spec.optim.lr)
    executor = PipelineExecutor(spec)
    try:
        executor.start()
        run_steps(executor, 2)
        peaks = ray.get([a.cache_peak.remote() for a in executor.actors], timeout=60)
        got = executor.stage_states()[2]["model/blocks/blocks.0.ffn.w1.weight"]
    finally:
        executor.shutdown()
    for step, loss in zip((1, 2), executor.history.losses):
        x, y = executor.corpus.train_batch(step, 8, 2)
        assert loss == pytest.approx(reference.train_step(x, y, [list(range(4))] * 8), abs=1e-6)
    torch.testing.assert_close(
        got, reference.parts.stages[2].blocks[0].ffn.w1.weight.detach(), atol=1e-6, rtol=0
    )
    assert peaks == [4, 3, 2, 1]


# `make test` runs the backward phase (mid-1F1B, forwards and backwards interleaved); the forward and optimizer
# phases are `extended` here, as under GPipe they are in `make test` (test_checkfree_phases.py).
@pytest.mark.parametrize(
    "phase",
    [
        pytest.param("forward", marks=pytest.mark.extended),
        "backward",
        pytest.param("optimizer", marks=pytest.mark.extended),
    ],
)
def test_failure_phases_under_1f1b(ray_local, phase):
    """A stage killed mid-forward, mid-backward or at its optimizer step under 1F1B: recovered, the record names
    the phase, and the run goes on to the end."""
    executor = PipelineExecutor(tiny_spec("checkfree", warm_standby=True, pipeline={"schedule": "1f1b"}))
    fail_at(executor, 1, 3, phase)
    try:
        executor.start()
        run_steps(executor, 4)
    finally:
        executor.shutdown()
    assert [(f.step, f.stage, f.method, f.phase) for f in executor.history.failures] == [
        (3, 1, "checkfree", phase)
    ]
    assert executor.history.steps == [1, 2, 3, 4]
