"""Training threads: the configured number, else the CPUs Ray assigned to the task, else the process's own."""

from __future__ import annotations

import torch

from lcsc_ray.recipes.training import ray_task_cpus, training_threads


def test_training_threads_prefers_config_then_ray_assignment_then_process():
    """A configured count wins; else whole assigned CPUs (at least 1); else the process's torch setting."""
    assert training_threads(3, 2.0, 1) == 3
    assert training_threads(None, 2.0, 1) == 2
    assert training_threads(None, 2.5, 1) == 2
    assert training_threads(None, 0.5, 4) == 1  # a fractional CPU still trains, on one thread
    assert training_threads(None, None, 4) == 4
    assert training_threads(None, None, 0) == 1


def test_outside_ray_training_keeps_the_process_setting(tmp_path):
    """In-process training (no Ray task) leaves torch at the process's thread count and reports it."""
    from lcsc_ray.recipes.mnist import train_ddpm

    assert ray_task_cpus() is None
    before = torch.get_num_threads()
    summary = train_ddpm(
        {
            "steps": 1,
            "batch_size": 4,
            "checkpoint_every": 1,
            "grid_samples": 0,
            "model": {"channels": [8, 16], "emb_dim": 16, "groups": 4, "attention": False},
            "out": str(tmp_path / "run"),
            "progress_interval_s": 60,
        }
    )
    assert summary["torch_threads"] == before == torch.get_num_threads()


def test_multi_thread_training_task_sleeps_at_openmp_barriers(monkeypatch):
    """A training task on >=2 CPUs gets OMP_WAIT_POLICY=PASSIVE (spinning threads stall on shared cores),
    unless the environment sets a policy; a 1-CPU task gets no extra environment."""
    from lcsc_ray.recipes.train import training_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert training_env(1.0) == {}
    assert training_env(2.0) == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert training_env(2.0) == {"OMP_WAIT_POLICY": "ACTIVE"}
