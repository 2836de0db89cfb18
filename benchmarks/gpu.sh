#!/usr/bin/env bash
# The project's GPU checks, for a machine that has torch, transformers, accelerate, pytest and
# hypothesis but neither dse's other dependencies nor the model files (docs/speed.md, "GPU"):
#   tests    the CUDA tests on tiny models (40 s on an H200)
#   llama    benchmarks/compile_decode.py over Llama-2-7B's architecture in bfloat16, dense and
#            SVD-LLM's uniform plans at -10/-20/-30 % (about 3 minutes: a compile per plan)
#   aligned  the same at -20/-30 % with ranks rounded down to multiples of 64 (about 2.5 minutes)
#   smollm2  SmolLM2-135M's architecture with the searched plans of docs/speed/plans (about 4 minutes)
# Random weights and random factors of the plans' ranks: decode speed depends on the shapes alone.
# Each phase has its own time limit and every plan prints its line as soon as it is measured, so a
# phase cut short still reports.
#
#     OUT=gpu-out bash benchmarks/gpu.sh [tests] [llama] [aligned] [smollm2]    (default: all four)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
phases=" ${*:-tests llama aligned smollm2} "
decode() {  # decode NAME SECONDS ARGS...: compile_decode.py in bfloat16 on cuda, one round
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" python3 benchmarks/compile_decode.py "$@" --device cuda --dtype bfloat16 --rounds 1 \
        --json "$OUT/$name.json" 2>&1 | grep -v -i warn | tee "$OUT/$name.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee "$OUT/gpu.txt"
if [[ $phases == *" tests "* ]]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py \
        tests/test_placement.py -k cuda 2>&1 | tee "$OUT/tests.txt" | tail -30
fi
if [[ $phases == *" llama "* ]]; then
    decode llama2-7b 220 --model-config spaces/llama2-7b-layer-ranks.yaml --uniform 0.1 0.2 0.3
fi
if [[ $phases == *" aligned "* ]]; then
    decode llama2-7b-aligned 165 --model-config spaces/llama2-7b-layer-ranks.yaml --uniform 0.2 0.3 --align 64
fi
if [[ $phases == *" smollm2 "* ]]; then
    decode smollm2 260 docs/speed/plans/params_-20.json docs/speed/plans/params_-30.json \
        docs/speed/plans/params_-20_aligned.json docs/speed/plans/params_-10.json \
        docs/speed/plans/latency_0.931.json --model-config benchmarks/configs/smollm2-135m.yaml
fi
