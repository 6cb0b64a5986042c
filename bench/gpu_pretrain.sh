#!/usr/bin/env bash
# Issue 13 on one H100 or H200, in at most 8 minutes, without Ray: our training loop with each set
# of speed levers (eager, + compile, + fused kernels, + both; activation checkpointing none and
# selective) for the 1b and 350m presets, seq 2048, bf16, at the largest micro batch that fits,
# next to plain PyTorch with the same levers (bench/gpu_pretrain.py says how); then the GPU tests.
#   bash bench/gpu_pretrain.sh [RESULTS_DIR]        (default bench/.out)
#
# The GPU machine has torch, triton, transformers, tokenizers, numpy and pytest, not DeepSpeed,
# pydantic, hjson, tensorboardX or liger-kernel. Before the device call, where pip reaches PyPI,
# put them into bench/wheels/ as wheels for CPython 3.12 on x86-64 (git ignores the folder; 5.8 MB
# in all, far below the 64 MiB a call carries):
#   P="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
#   .venv/bin/pip download --no-deps $P -d bench/wheels liger-kernel==0.8.5 pydantic==2.14.4 pydantic-core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0 tensorboardX==2.6.5
#   .venv/bin/pip download --no-deps --no-binary=:all: -d /tmp/ds deepspeed==0.19.8      # PyPI has only its sdist
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation -w bench/wheels /tmp/ds/deepspeed-0.19.8.tar.gz
# (sizes: deepspeed 2.2 MB, pydantic-core 2.3 MB, liger-kernel 0.9 MB, pydantic 0.5 MB, the other five 0.2 MB)
# Then call the device tool: run(command="bash bench/gpu_pretrain.sh $OUT", carry=["bench/wheels"], timeout_s=600).
# Time: ~20 s of set-up, the matrix's budget of 240 s (stopped at 250), the tests (stopped at 180).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/.out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  site=/tmp/gpu-bench-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    bench/wheels/*.whl || { echo "installing bench/wheels failed"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:$site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as m, importlib.util, sys
import torch
print("python3", sys.version.split()[0], "cuda", torch.version.cuda, ", ".join(
    f"{name} {m.version(name) if importlib.util.find_spec(module) else 'MISSING'}"
    for name, module in [("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                         ("deepspeed", "deepspeed"), ("pydantic", "pydantic"), ("liger-kernel", "liger_kernel"),
                         ("tensorboardX", "tensorboardX")]))
EOF
status=0
timeout -k 10 250 python3 bench/gpu_pretrain.py --budget 240 --json "$out/gpu_pretrain.jsonl" \
  --log "$out/gpu_pretrain_workers.log" 2>&1 | tee "$out/gpu_pretrain.txt" || status=1
timeout -k 10 180 python3 -m pytest -v -p no:cacheprovider --noconftest tests/test_train_gpu.py 2>&1 \
  | tee "$out/test_train_gpu.txt" || status=1
exit $status
