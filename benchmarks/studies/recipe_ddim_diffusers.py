"""Does the MNIST recipe's DDIM on diffusers' DDIMScheduler score the same FID as the recipe's own DDIM before it?

The recipe's forward process moved to diffusers' DDPMScheduler (`squaredcos_cap_v2`, float32) and its DDIM
to DDIMScheduler ("trailing" spacing). The update is the same DDIM equation; what changed is the timesteps
(diffusers visits 999, 899, ..., 99 at 10 steps; the earlier sampler rounded to 999, ..., 599, 500, 400, ...,
100) and the schedule's precision. The earlier sampler is kept below, frozen, as the "before" side. The
consistency sampler kept its own loop; only its schedule changed (float64 written out -> DDPMScheduler's
float32 `alphas_cumprod`), so its "before" is the same sampler over the schedule written out.

Side by side, paired over the same noise seeds: for three models of the benchmarks' default DDPM run (last
checkpoint, the run's EMA, the uniform soup of the last 12 checkpoints) at 10 steps, and the distilled
consistency model's EMA at 2 steps, both sides draw the same number of images from each seed's noise, scored
by the recipe's FID (its feature network against the MNIST reference statistics). The difference
after - before is reported with its paired 95% interval per model.

    .venv/bin/python benchmarks/studies/recipe_ddim_diffusers.py [--quick]

Runtime: 4 models x 2 sides x 8 seeds of 1000 samples, about 2.5 min on 2 quiet cores.
Writes benchmarks/results/recipe_ddim_diffusers.json and .md (--quick: outputs/bench/quick/).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
import lcsc_setup as setup

SEEDS = [2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008]


def written_out_cosine(num_timesteps: int):
    """alpha_bar of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17) in float64, as the recipe had it."""
    import torch

    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((grid + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.cumprod(1 - (1 - f[1:] / f[:-1]).clamp(max=0.999), dim=0)


def before_consistency_sample(model, n: int, seed: int, nfe: int, batch_size: int = 250):
    """The consistency sampler over the schedule it had before (float64, written out)."""
    from lcsc_ray.recipes.mnist import consistency_sample

    after = model.alpha_bar
    model.alpha_bar = written_out_cosine(model.config.num_timesteps)
    try:
        return consistency_sample(model, n, seed, nfe, batch_size)
    finally:
        model.alpha_bar = after


def before_ddim_sample(model, n: int, seed: int, nfe: int, batch_size: int = 250):
    """The recipe's DDIM before the move (frozen): float64 cosine schedule written out, timesteps
    round((T-1)(1 - i/nfe)), x0 clipped and eps recomputed from it, the last step to alpha_bar = 1."""
    import torch

    steps_t = model.config.num_timesteps
    alpha_bar = written_out_cosine(steps_t)
    steps = [round((steps_t - 1) * (1 - i / nfe)) for i in range(nfe)]
    noise = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, 1, 28, 28)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = noise[start : start + batch_size]
            for i, t in enumerate(steps):
                a_t, s_t = alpha_bar[t].sqrt().item(), (1 - alpha_bar[t]).sqrt().item()
                v = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
                x0 = (a_t * x - s_t * v).clamp(-1, 1)
                eps = (x - a_t * x0) / s_t
                ab_prev = alpha_bar[steps[i + 1]].item() if i + 1 < len(steps) else 1.0
                x = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
            out[start : start + batch_size] = x.clamp(-1, 1)
    return out


def models(spec, cm_spec) -> dict:
    """name -> (model, nfe, sampler before, sampler after): the DDPM run's last checkpoint, its EMA and the
    uniform soup of its last 12 checkpoints at 10 steps; the consistency model's EMA at 2 steps."""
    import torch

    from lcsc_ray.checkpoints import list_checkpoints, read_state_dict
    from lcsc_ray.plugins import build
    from lcsc_ray.recipes.mnist import consistency_sample, ddim_sample

    uris = [uri for uri, _step in list_checkpoints(spec.checkpoints)]
    states = [read_state_dict(uri) for uri in uris]
    soup = {key: torch.stack([s[key].float() for s in states]).mean(0) for key in states[0]}
    out = {}
    for name, state in (
        ("last checkpoint", states[-1]),
        ("run EMA", read_state_dict(spec.checkpoints.ema_uri)),
        ("uniform soup", soup),
    ):
        model = build(spec.model)
        model.load_state_dict(state)
        out[name] = (model.eval(), spec.sampler.nfe, before_ddim_sample, ddim_sample)
    consistency = build(cm_spec.model)
    consistency.load_state_dict(read_state_dict(cm_spec.checkpoints.ema_uri))
    out["consistency EMA"] = (
        consistency.eval(),
        cm_spec.sampler.nfe,
        before_consistency_sample,
        consistency_sample,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Score both samplers on every (model, seed); print the paired table and write the result."""
    import torch

    from lcsc_ray.fid import feature_stats, fid_from_stats, reference_stats_for
    from lcsc_ray.plugins import build
    from schemas.search import SearchSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds of 200 samples (a smoke run)")
    args = parser.parse_args(argv)
    seeds, samples = (SEEDS[:2], 200) if args.quick else (SEEDS, 1000)
    torch.set_num_threads(2)
    setup.ensure_trained(cm=True)
    out = setup.BENCH_OUT / "recipe-ddim-diffusers"
    spec = SearchSpec.model_validate(setup.make_spec(str(out), nfe=10))
    cm_spec = SearchSpec.model_validate(setup.make_spec(str(out), cm=True, nfe=2))
    ref_cache = setup.BENCH_OUT / "cache" / "reference_stats"
    if ref_cache.exists():
        shutil.copytree(ref_cache, out / "reference_stats", dirs_exist_ok=True)
    mu, sigma = reference_stats_for(spec)
    features = build(spec.fid.features)
    started = time.monotonic()
    fids: dict[str, dict[str, list[float]]] = {}
    nfes: dict[str, int] = {}
    for name, (model, nfe, before, after) in models(spec, cm_spec).items():
        nfes[name] = nfe
        for seed in seeds:
            for side, sample in (("before", before), ("after", after)):
                images = sample(model, samples, seed, nfe, 250)
                fid = fid_from_stats(feature_stats(features, images, 500), mu, sigma)
                fids.setdefault(name, {}).setdefault(side, []).append(fid)
            row = fids[name]
            print(
                f"  {name:16s} seed {seed}: before {row['before'][-1]:6.2f}  after {row['after'][-1]:6.2f}",
                flush=True,
            )
    rows = []
    for name, row in fids.items():
        diff = setup.paired(row["after"], row["before"])
        rows.append(
            {
                "model": name,
                "nfe": nfes[name],
                "before": setup.mean_sd(row["before"]),
                "after": setup.mean_sd(row["after"]),
                "after_minus_before": diff,
                "fids": row,
            }
        )
    wall = time.monotonic() - started
    table = ["| model | steps | before | after | after - before [95% CI] |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['nfe']} | {r['before'][0]:.1f} ± {r['before'][1]:.1f} | "
            f"{r['after'][0]:.1f} ± {r['after'][1]:.1f} | {setup.fmt_paired(r['after_minus_before'])} |"
        )
    markdown = "\n".join(
        [
            "# The recipe's DDIM on diffusers' DDIMScheduler against its own DDIM before",
            "",
            (
                f"FID of {samples} samples, {len(seeds)} noise seeds shared by both sides, on the benchmarks' default "
                "DDPM run and its distilled consistency model (`benchmarks/studies/recipe_ddim_diffusers.py`). Before: the "
                "recipe's own DDIM (float64 cosine written out, timesteps ending at 100); after: diffusers' DDIMScheduler "
                "over DDPMScheduler's schedule (timesteps ending at 99). 'win'/'loss' mean the paired 95% interval "
                "excludes zero; the seed-to-seed spread (±, SD) is the scale to read the shift against."
            ),
            "",
            *table,
            "",
            f"Wall time {wall:.0f} s; machine: {setup.machine_info()['cores']} cores.",
            "",
        ]
    )
    print("\n" + "\n".join(table))
    payload = {
        "num_samples": samples,
        "seeds": seeds,
        "rows": rows,
        "wall_s": round(wall, 1),
        "machine": setup.machine_info(),
    }
    path = setup.write_result("recipe_ddim_diffusers", payload, quick=args.quick, markdown=markdown)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
