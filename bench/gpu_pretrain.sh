#!/usr/bin/env bash
# One H100 (or any CUDA GPU), a few minutes: our loop without Ray (DeepSpeed ZeRO-2, bf16, seq 2048)
# next to plain PyTorch, for a ~350M and a ~1B model; then the GPU tests (NCCL, bf16, ZeRO-2/3).
# Needs torch, transformers, tokenizers, deepspeed, pydantic, tensorboardX and pytest; not Ray.
#   bash bench/gpu_pretrain.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/.out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
status=0
timeout 170 python3 bench/gpu_pretrain.py --preset 350m --micro-batch 8 --json "$out/gpu_pretrain.jsonl" || status=1
timeout 170 python3 bench/gpu_pretrain.py --preset 1b --micro-batch 8 --json "$out/gpu_pretrain.jsonl" || status=1
timeout 150 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_train_gpu.py || status=1
exit $status
