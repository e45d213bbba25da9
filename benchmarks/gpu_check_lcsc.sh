#!/usr/bin/env bash
# GPU check of LCSC evaluation (under 5 minutes on one GPU). Run from the repository root on a machine with a
# CUDA GPU and a CUDA build of torch in .venv:
#
#     bash benchmarks/gpu_check_lcsc.sh
#
# 1. a search (budget 8, bfloat16 sampling) over small diffusers checkpoints, on 2 evaluators sharing the GPU,
#    with the final scores split across both (split_min_samples below the held-out sample count);
# 2. evaluations per second of 1 and 2 evaluators sharing one GPU (benchmarks/evaluators.py --gpu).
# Writes benchmarks/results/gpu_check_lcsc.json. Until it has run on a GPU, GPU evaluation is untested.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch " + torch.__version__)'

timeout 240 "$PY" - "$WORK" <<'PYEOF'
import json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "benchmarks")
from evaluators import write_diffusers_run

from lcsc_ray.search import run_search
from schemas.search import SearchSpec

work = Path(sys.argv[1])
run = write_diffusers_run(work / "run")
spec = SearchSpec.model_validate({
    "checkpoints": {"uri": str(run), "format": "diffusers"},
    "sampler": {"target": "lcsc_ray.diffusers_sampling:sample", "nfe": 10, "kwargs": {"scheduler": "DDIM"}},
    "fid": {"features": {"target": "benchmarks.evaluators:features", "kwargs": {"image": 28}},
            "reference": {"dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 256}}},
            "num_samples": 500, "holdout_seeds": [11, 12], "holdout_num_samples": 2000},
    "evaluators": {"num_actors": 2, "num_cpus": 1, "num_gpus": 0.5, "batch_size": 250, "dtype": "bfloat16",
                   "split_min_samples": 1000},
    "search": {"budget": 8, "ema_decays": [0.5]},
    "output": {"uri": str(work / "out")},
})
start = time.perf_counter()
result = run_search(spec)
report = {"search": {"wall_s": time.perf_counter() - start, "best_fid": result.best.fid,
                     "baselines": {b.label: b.fid for b in result.baselines}, "num_failed": result.num_failed,
                     "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}}
Path(work / "search.json").write_text(json.dumps(report))
print(json.dumps(report, indent=2))
PYEOF

timeout 200 "$PY" benchmarks/evaluators.py --throughput-only --quick --gpu --counts 1 2  # -> outputs/bench/quick/

"$PY" - "$WORK" <<'PYEOF'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from _common import machine_info, write_json

work = Path(sys.argv[1])
result = {"machine": machine_info(), **json.loads((work / "search.json").read_text()),
          "throughput": json.loads(Path("outputs/bench/quick/evaluators_throughput.json").read_text())["throughput"]}
print("->", write_json(Path("benchmarks/results/gpu_check_lcsc.json"), result))
PYEOF
