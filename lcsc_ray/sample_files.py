"""`lcsc-ray samples`: write the exact samples a search scored for one candidate, and their FID.

diffusers' own `DDIMPipeline` seeded with `fid.seed` does not draw the scored samples: chunk j of an
evaluation draws its noise from `chunk_seed(fid.seed, j)`. This writes those samples as PNG files (uint8) and,
optionally, an .npz of the float samples the FID was computed from, with `samples.json` giving the FID
recomputed here beside the one the search reported.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import torch
from PIL import Image

from lcsc_ray.candidate_samples import (
    Candidate,
    CandidateModel,
    combined_flats,
    default_device,
    find_candidate,
    reported_fid,
    scored_samples,
    weights_flat,
)
from lcsc_ray.checkpoints import checkpoint_name, list_checkpoints
from lcsc_ray.export import read_coefficients
from lcsc_ray.report import load_result
from rayops import storage
from schemas.errors import CheckpointError, SpecError
from schemas.search import SearchResult

log = logging.getLogger(__name__)


def parse_coefficients(value: str) -> list[float]:
    """A JSON list given inline ('[0.1, 0.9]') or a file/URI holding one (a combined.json or result.json too)."""
    if value.lstrip().startswith("["):
        try:
            return [float(x) for x in json.loads(value)]
        except (ValueError, TypeError) as exc:
            raise SpecError(f"--coefficients {value!r} is no JSON list of numbers ({exc})") from None
    return read_coefficients(value)


def choose_candidate(
    result: SearchResult, candidate: str | None, coefficients: list[float] | None, weights_uri: str | None
) -> Candidate:
    """The candidate of exactly one of --candidate, --coefficients, --weights (default: the winner); given
    coefficients that the search reported keep that row's score."""
    if sum(x is not None for x in (candidate, coefficients, weights_uri)) > 1:
        raise SpecError("give one of --candidate, --coefficients and --weights")
    if weights_uri is not None:
        return Candidate("weights", [], None, weights_uri)
    if coefficients is None:
        return find_candidate(result, candidate or "best")
    rows = [result.best, *result.baselines]
    match = next(
        (
            r
            for r in rows
            if len(r.coefficients) == len(coefficients) and np.allclose(r.coefficients, coefficients)
        ),
        None,
    )
    return Candidate(match.label if match else "coefficients", coefficients, match)


def check_same_checkpoints(result: SearchResult) -> None:
    """The checkpoint set must still be the one the search combined (same names, in step order)."""
    found = [checkpoint_name(uri) for uri, _ in list_checkpoints(result.spec.checkpoints)]
    if found != result.checkpoint_names:
        raise CheckpointError(
            f"the checkpoints at {result.spec.checkpoints.uri} are now {found[:4]}..., but the search combined "
            f"{result.checkpoint_names[:4]}... ({len(result.checkpoint_names)} files); its samples cannot be "
            "redrawn from another set: restore the files, or run the search again"
        )


def png_bytes(image: np.ndarray) -> bytes:
    """One image (C, H, W) in [-1, 1] as an 8-bit PNG (gray for one channel)."""
    pixels = np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (H, W, C)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_samples(
    output_uri: str,
    out_dir: str,
    candidate: str | None = None,
    coefficients: list[float] | None = None,
    weights_uri: str | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    npz: bool = False,
) -> dict:
    """Draw a candidate's scored samples (default: the reported sample count and the search seed), write them
    as `out_dir/NNNNNN.png` (and `samples.npz` with `npz`), and `samples.json`; returns that summary."""
    result = load_result(output_uri)
    # the output as it lies now (it may have moved): its cached reference statistics are read from here
    spec = result.spec.model_copy(
        update={"output": result.spec.output.model_copy(update={"uri": output_uri})}
    )
    check_same_checkpoints(result)
    chosen = choose_candidate(result, candidate, coefficients, weights_uri)
    num_samples = num_samples or result.best.num_samples
    seed = spec.fid.seed if seed is None else seed
    if chosen.weights_uri is not None:
        layout, flat = weights_flat(spec, chosen.weights_uri)
    else:
        layout, (flat,) = combined_flats(spec, [chosen.coefficients])
    model = CandidateModel(spec, layout, torch.device(device) if device else default_device(spec))
    model.load(flat, chosen.label)
    kept: list[np.ndarray] = []

    def write_chunk(first: int, images: torch.Tensor) -> None:
        array = images.cpu().numpy()
        for offset, image in enumerate(array):
            storage.write_bytes(storage.join(out_dir, f"{first + offset:06d}.png"), png_bytes(image))
        if npz:
            kept.append(array)

    fid = scored_samples(spec, model, num_samples, seed, write_chunk)
    reported = reported_fid(chosen.score, spec, num_samples, seed)
    summary = {
        "candidate": chosen.label,
        "coefficients": chosen.coefficients,
        "weights": chosen.weights_uri,
        "num_samples": num_samples,
        "seed": seed,
        "fid": fid,
        "reported_fid": reported,
        "device": str(model.device),
        "search": output_uri,
    }
    if npz:
        buffer = io.BytesIO()
        np.savez(buffer, images=np.concatenate(kept), seed=seed)
        storage.write_bytes(storage.join(out_dir, "samples.npz"), buffer.getvalue())
    storage.write_bytes(storage.join(out_dir, "samples.json"), json.dumps(summary, indent=2).encode())
    return summary
