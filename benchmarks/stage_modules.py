"""Our stage modules vs transformers' LlamaDecoderLayer stack: one pipeline stage's forward + backward.

`python benchmarks/stage_modules.py [--quick]` times a training hop of one stage (the default pipeline stage:
d 128, 2 blocks, 16 sequences of 128 tokens, 1 torch thread) built both ways from the same weights, in
alternating paired rounds, prints the ratio and writes benchmarks/results/stage_modules.json. Both compute the
same outputs (checked to 1e-5 first).

Runtime: about 15-30 s on one core (7 rounds of 10 hops each way, ~13 s of hops at load 3-15, plus imports);
`--quick` runs 3 rounds of 5, under 10 s (written under outputs/bench/quick/).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from checkfree_ray.hf_llama import hf_config_dict, stage_states_to_hf
from checkfree_ray.model import ModelConfig, build_parts
from checkfree_ray.stage import initial_stage_state
from schemas.train import LlamaSpec

OURS, THEIRS = "ours", "transformers"


class HFStage(torch.nn.Module):
    """A stack of transformers' LlamaDecoderLayer with its rotary embedding, as a stage would hold it."""

    def __init__(self, config, layers: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(layers))
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])[None]
        embeddings = self.rotary(x, positions)
        for layer in self.layers:
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            x = out[0] if isinstance(out, tuple) else out
        return x


def build(layers: int, d: int, heads: int, seq_len: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our Stage and the transformers stack with identical weights (the export mapping)."""
    import transformers

    cfg = ModelConfig.from_spec(LlamaSpec(d_model=d, n_layers=layers * 2, n_heads=heads, seq_len=seq_len), 2)
    parts = build_parts(cfg, 0)
    config = transformers.LlamaConfig(**hf_config_dict(cfg))
    config._attn_implementation = "sdpa"
    theirs = HFStage(config, layers)
    hf = stage_states_to_hf([initial_stage_state(parts, 0), initial_stage_state(parts, 1)], cfg)
    theirs.layers.load_state_dict(
        {
            k[len("model.layers.") :]: v
            for k, v in hf.items()
            if k.startswith("model.layers.") and int(k.split(".")[2]) < layers
        }
    )
    return parts.stages[0], theirs


def hop_seconds(stage: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward of one micro-batch through `stage`."""
    times = []
    for _ in range(repeats):
        inp = x.clone().requires_grad_(True)
        start = time.perf_counter()
        stage(inp).pow(2).mean().backward()
        times.append(time.perf_counter() - start)
        stage.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    cli = harness.parser(__doc__, seeds=range(7), quick_seeds=range(3))
    cli.add_argument(
        "--repeats", type=int, default=None, help="hops per round and stage (default 10; quick 5)"
    )
    args = cli.parse_args()
    repeats = args.repeats or (5 if args.quick else 10)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours, theirs = build(layers=2, d=128, heads=4, seq_len=128)
    x = torch.randn(16, 128, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5), "the two stages differ"
    import transformers

    record = harness.run_record(args, transformers=transformers.__version__)
    stages = {OURS: ours, THEIRS: theirs}
    sweep = harness.Sweep(
        "stage_modules",
        configs={OURS: "checkfree_ray.model Stage", THEIRS: "transformers LlamaDecoderLayer stack"},
        seeds=harness.chosen_seeds(args),
        measure=lambda name, _what, _round: {"seconds": hop_seconds(stages[name], x, repeats)},
        describe=(
            f"median seconds of {repeats} forward + backward hops of one stage (d 128, 2 blocks, 16 sequences of "
            "128 tokens, 1 torch thread) per round (= seed), both stacks from the same weights, alternating"
        ),
    )
    rows = harness.run_sweep(sweep, harness.results_dir(args), fresh=True)  # timings are never reused
    by_round = {(r["config"], r["seed"]): r["seconds"] for r in rows}
    pairs = [{"ours_s": by_round[(OURS, s)], "transformers_s": by_round[(THEIRS, s)]} for s in sweep.seeds]
    for p in pairs:
        p["ratio"] = p["transformers_s"] / p["ours_s"]
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(f"median transformers / ours: {ratio:.3f}")
    sweep.extra.update(
        shape={"d_model": 128, "blocks": 2, "batch": 16, "seq_len": 128},
        rounds=pairs,
        median_ratio_transformers_over_ours=ratio,
    )
    paired = harness.paired_table(rows, "seconds", baseline=OURS, better="lower")
    harness.finish(
        sweep,
        args,
        record,
        rows,
        paired=[paired],
        notes=[f"median ratio transformers / ours over {len(pairs)} rounds: {ratio:.3f}"],
        title="Stage modules against transformers' decoder layers",
    )


if __name__ == "__main__":
    main()
