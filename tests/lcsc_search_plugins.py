"""Samplers for the search tests: one that logs every call, one that kills its own process once, one that hangs
once, one that fails deterministically, one with the wrong signature."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from tests.lcsc_plugins import toy_sample


def counting_sample(
    model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, seconds: float = 0.0
) -> torch.Tensor:
    """toy_sample, appending one line per call to log_dir/calls.log (pid, seed, n); with `seconds`, each call
    takes at least that long, as a real sampler does (a harness that kills at moments of the search can then
    catch each one, even polling on crowded cores)."""
    with open(Path(log_dir) / "calls.log", "a") as handle:
        handle.write(f"{os.getpid()} {seed} {n}\n")
    time.sleep(seconds)
    return toy_sample(model, n, seed, nfe, batch_size)


def crashing_sample(
    model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, crash_on_call: int = 3
):
    """toy_sample, but the process dies (SIGKILL-like, no cleanup) on the `crash_on_call`-th call overall."""
    marker = Path(log_dir) / "calls.log"
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    calls = len(marker.read_text().splitlines())
    if calls == crash_on_call:
        (Path(log_dir) / "crashed").write_text(str(os.getpid()))
        os._exit(1)
    return toy_sample(model, n, seed, nfe, batch_size)


def hanging_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, hang_on_call: int = 2):
    """toy_sample, but the `hang_on_call`-th call overall never returns (its pid is written to log_dir/hung)."""
    marker = Path(log_dir) / "calls.log"
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if len(marker.read_text().splitlines()) == hang_on_call:
        (Path(log_dir) / "hung").write_text(str(os.getpid()))
        threading.Event().wait(3600)
    return toy_sample(model, n, seed, nfe, batch_size)


def failing_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, fail_after: int = 1):
    """toy_sample for the first `fail_after` calls, then a ValueError on every call (a deterministic bug)."""
    marker = Path(log_dir) / "calls.log"
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if len(marker.read_text().splitlines()) > fail_after:
        raise ValueError("broken sampler: this candidate cannot be sampled")
    return toy_sample(model, n, seed, nfe, batch_size)


def two_argument_sample(model, n):
    """A sampler with the wrong signature (no seed, nfe or batch size)."""
    return toy_sample(model, n, 0, 1, n)


def gated_sample(model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, wait_s: float = 120.0):
    """toy_sample, after logging the call and waiting (at most `wait_s`) for the file log_dir/open to exist."""
    with open(Path(log_dir) / "calls.log", "a") as handle:
        handle.write(f"{os.getpid()} {seed} {n}\n")
    gate = Path(log_dir) / "open"
    for _ in range(int(wait_s * 20)):
        if gate.exists():
            break
        threading.Event().wait(0.05)
    return toy_sample(model, n, seed, nfe, batch_size)


def trial_killing_sample(
    model, n: int, seed: int, nfe: int, batch_size: int, log_dir: str, kill_on_call: int = 3
):
    """toy_sample, but the `kill_on_call`-th call overall first SIGKILLs every live Ray Tune trial process (the
    trials waiting on this evaluation among them); the pids killed go to log_dir/killed_trials."""
    import signal

    import ray

    with open(Path(log_dir) / "calls.log", "a") as handle:
        handle.write(f"{os.getpid()} {seed} {n}\n")
    if len((Path(log_dir) / "calls.log").read_text().splitlines()) == kill_on_call:
        trials = [
            info["Pid"]
            for info in ray._private.state.actors().values()
            if info["State"] == "ALIVE" and "ImplicitFunc" in info["ActorClassName"] and info["Pid"]
        ]
        for pid in trials:
            os.kill(pid, signal.SIGKILL)
        (Path(log_dir) / "killed_trials").write_text(" ".join(map(str, trials)))
    return toy_sample(model, n, seed, nfe, batch_size)
