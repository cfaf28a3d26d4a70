#!/usr/bin/env bash
# The accelerator checks of #19, for one lent GPU (meant to take under 8 minutes on an H100/H200):
#   bash benchmarks/gpu.sh [OUT]
# tests/test_attention.py (cuDNN attention against the einsum path, logits and gradients), then
# decode tokens/s at batch 64 and 256 of a ~0.5B bf16 model against transformers and the HBM roofline
# (benchmarks/sampling.py --gpu), full fine-tuning tokens/s and MFU against PyTorch on the same GPU
# (benchmarks/train.py --gpu), and a jax.profiler summary of one decode step and one train step
# (benchmarks/gpu_profile.py), and where three stacked small students spend their step against three
# sequential ones (benchmarks/train_profile.py --small). Rows are appended to BENCHMARKS.md; OUT (default
# gpu-out/) receives the logs, profile.json and a copy of BENCHMARKS.md. Wheels of packages the GPU
# image lacks (grain, ml-collections, gguf, tensorboardX, ...) are installed from .whl/ when that folder
# exists (there is no network there).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
if [ -d .whl ]; then python -m pip install -q --no-deps --no-index .whl/*.whl >"$out/install.log" 2>&1; fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PIP_NO_INDEX=1  # no network: the registry fails fast
export AGORA_JAX_ATTENTION=cudnn  # the fused attention of the training forward (opt-in, transformer.fused_attention)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
status=0
python -m pytest -q -x tests/test_attention.py >"$out/tests.log" 2>&1 || { status=1; echo "FAILED: tests/test_attention.py"; }
for step in "benchmarks/sampling.py --gpu --quick" "benchmarks/train.py --gpu --quick" \
            "benchmarks/gpu_profile.py --out $out" "benchmarks/train_profile.py --small --steps 20"; do
  echo "== python $step" | tee -a "$out/gpu.log"
  start=$SECONDS
  python $step >>"$out/gpu.log" 2>&1 || { status=1; echo "FAILED: $step" | tee -a "$out/gpu.log"; }
  echo "== $((SECONDS - start)) s" | tee -a "$out/gpu.log"
done
grep -E "^RATIO|tokens/s|wrote|^\| (all XLA ops|wall)" "$out/gpu.log"
cp BENCHMARKS.md "$out/"
exit $status
