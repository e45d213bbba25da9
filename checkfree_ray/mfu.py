"""Throughput arithmetic of a training run (pure functions): FLOPs per token and model FLOPs utilisation (MFU)
against a device's peak."""

from __future__ import annotations

from schemas.train import TrainSpec

# Peak dense bf16 FLOP/s per device by torch.cuda.get_device_name() substring (no sparsity); CPUs: none.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def model_flops_per_token(parameters: int) -> float:
    """Training FLOPs per token, 6·N (forward 2N, backward 4N; attention's T-dependent term left out)."""
    return 6.0 * parameters


def mfu(tokens_per_s: float, parameters: int, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved 6·N FLOP/s over the peak of all devices; None without a known peak."""
    if not peak_flops or devices <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * model_flops_per_token(parameters) / (peak_flops * devices)


def device_peak_flops(spec: TrainSpec, device_name: str | None) -> float | None:
    """`pipeline.peak_flops` from the spec, else the table's entry for a GPU's name; None on CPU or unknown."""
    if spec.pipeline.peak_flops is not None:
        return spec.pipeline.peak_flops
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)
