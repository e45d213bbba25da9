#!/usr/bin/env bash
# GPU check of CheckFree training (under 8 minutes on one GPU). Run from the repository root on a machine with a
# CUDA GPU and a CUDA build of torch in .venv:
#
#     bash benchmarks/gpu_check.sh
#
# 1. the engine tests on GPU stages (tests/test_checkfree_hf_gpu.py: float32 stages equal CPU training,
#    a bf16 run with a stage killed);
# 2. a short bf16 run of a ~100M-parameter Llama (d 768, 12 layers, 4 stages sharing the GPU) with one stage kill
#    and its recovery, reporting tokens/s and MFU;
# 3. 1F1B with activations over NCCL (Ray Direct Transport): 10 steps of a smaller bf16 model under
#    activation_transport nccl and under object_store (losses compared), then an NCCL run with a stage killed
#    (checkpoint strategy: rollback, the NCCL group formed again over the new actor, or a fallback said in the log);
# 4. the pipeline benchmark (benchmarks/pipeline.py --quick --sections throughput --seeds 0 1 2).
# Writes benchmarks/results/gpu_check.json. Until it has run on a GPU, the GPU path is untested. Each part has its
# own timeout (120 + 170 + 100 + 110 s), so the script ends within 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch " + torch.__version__)'

set +e
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_checkfree_hf_gpu.py > "$WORK/tests.log" 2>&1
TESTS_RC=$?
set -e
tail -5 "$WORK/tests.log"

timeout 170 "$PY" - "$WORK" <<'PYEOF'
import json, sys, time
from pathlib import Path

import torch

from checkfree_ray import run_training
from schemas.train import TrainSpec

work = Path(sys.argv[1])
spec = TrainSpec.model_validate({
    "name": "gpu-check-100m", "steps": 30, "eval_every": 20, "eval_batches": 2,
    "model": {"d_model": 768, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "seq_len": 512},
    "pipeline": {"num_stages": 4, "micro_batches": 8, "micro_batch_size": 8, "num_cpus_per_stage": 1,
                 "num_gpus_per_stage": 0.25, "precision": "bf16", "torch_threads": 2, "warm_standby": True},
    "optim": {"lr": 6e-4, "schedule": "cosine", "warmup_steps": 5, "min_lr": 6e-5, "weight_decay": 0.1},
    "recovery": {"strategy": "checkfree+"}, "failures": {"schedule": [[15, 2]]},
    "output": {"uri": str(work / "run")},
})
start = time.perf_counter()
result = run_training(spec, progress=True)
report = {"run_100m": {
    "wall_s": time.perf_counter() - start, "parameters": result.model_parameters, "tokens_per_s": result.tokens_per_s,
    "mfu": result.mfu, "median_step_s": result.median_step_s, "first_loss": result.losses[0],
    "final_loss": result.losses[-1], "final_val_loss": result.final_val_loss,
    "failures": [f.model_dump() for f in result.failures], "gpu": torch.cuda.get_device_name(0),
    "torch": torch.__version__}}
(work / "run.json").write_text(json.dumps(report))
print(json.dumps(report, indent=2))
PYEOF

timeout 100 "$PY" - "$WORK" <<'PYEOF' || true
import json, sys

import ray

from checkfree_ray.executor import PipelineExecutor
from schemas.train import TrainSpec

work = sys.argv[1]


def spec(transport, kill=None):
    return TrainSpec.model_validate({
        "steps": 10, "model": {"d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 256},
        "pipeline": {"num_stages": 4, "micro_batches": 8, "micro_batch_size": 4, "num_cpus_per_stage": 1,
                     "num_gpus_per_stage": 0.25, "precision": "bf16", "schedule": "1f1b", "warm_standby": True,
                     "activation_transport": transport},
        "recovery": {"strategy": "checkpoint"}, "checkpointing": {"every": 3},
        "failures": {"schedule": [kill] if kill else []}})


def run(transport, kill=None):
    executor = PipelineExecutor(spec(transport, kill), checkpoint_uri=f"{work}/ckpt-{transport}-{bool(kill)}")
    executor.start()
    chosen = executor.transport.name
    try:
        step = 1
        while step <= 10:
            step = executor.run_step(step)
    finally:
        executor.shutdown()
    h = executor.history
    return {"transport_at_start": chosen, "transport_at_end": executor.transport.name, "losses": h.losses,
            "median_step_s": sorted(h.step_times)[len(h.step_times) // 2],
            "failures": [f.model_dump() for f in h.failures]}


ray.init(address="local", include_dashboard=False)
report = {"one_f_one_b_nccl": run("nccl"), "one_f_one_b_object_store": run("object_store")}
a, b = report["one_f_one_b_nccl"]["losses"], report["one_f_one_b_object_store"]["losses"]
report["max_loss_difference_nccl_vs_object_store"] = max(abs(x - y) for x, y in zip(a, b))
report["nccl_with_kill"] = run("nccl", kill=[6, 1])
(open(f"{work}/nccl.json", "w")).write(json.dumps(report))
print(json.dumps({k: v for k, v in report.items() if k != "nccl_with_kill"}, indent=2)[:2000])
print(json.dumps(report["nccl_with_kill"], indent=2)[:2000])
PYEOF

timeout 110 "$PY" benchmarks/pipeline.py --quick --sections throughput --seeds 0 1 2 && cp outputs/bench/quick/pipeline.json "$WORK/pipeline.json" || true

"$PY" - "$WORK" "$TESTS_RC" <<'PYEOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from _common import machine_info, write_json

work, tests_rc = Path(sys.argv[1]), int(sys.argv[2])
pipeline, nccl = work / "pipeline.json", work / "nccl.json"
result = {"machine": machine_info(), "engine_tests": {"exit_code": tests_rc,
                                                      "tail": (work / "tests.log").read_text()[-2000:]},
          **json.loads((work / "run.json").read_text()),
          "nccl_1f1b": json.loads(nccl.read_text()) if nccl.exists() else None,
          "pipeline": json.loads(pipeline.read_text()) if pipeline.exists() else None}
print("->", write_json(Path("benchmarks/results/gpu_check.json"), result))
sys.exit(tests_rc)
PYEOF
