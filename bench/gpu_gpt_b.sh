#!/usr/bin/env bash
# GPT-B benchmarks on one CUDA GPU (sampler tokens/s and ratios at batch 16/64/256 in bf16, then the
# env/oracle benchmark with --gpt-b), about 2-6 minutes. Run from anywhere:  bash bench/gpu_gpt_b.sh
# Log: $OUT/gpu_bench.log ($OUT defaults to /tmp). PYTHON picks the interpreter (default python3).
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_bench.log
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

log() { echo "$@" | tee -a "$LOG"; }
step() {  # step SECONDS CMD...: run one benchmark under a time limit, keep going if it fails
  local t=$1; shift
  log "=== $* (limit ${t}s)"
  timeout "$t" "$@" 2>&1 | tee -a "$LOG"
  log "=== exit $? after ${SECONDS}s total"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' \
  2>&1 | tee -a "$LOG"

# The sampler benchmark needs only torch/numpy/tqdm; the env benchmark also needs the project's
# other dependencies (torchrl, tensordict, gymnasium, omegaconf). Offline machines may bring them as
# wheels in .whl/ (installed to /tmp/site); otherwise install the project first (pip install -e .).
ENV_DEPS='import torchrl, tensordict, gymnasium, omegaconf'
if ! $PY -c "$ENV_DEPS" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG" && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# Any-order KV vs raster KV vs O(L^2) recompute, full L = 256 for every sampler (no --recompute-steps).
for B in 16 64 256; do
  step 100 $PY scripts/bench_backbone.py --device cuda --dtype bfloat16 --batch "$B"
done

# Env throughput/overhead and oracle speedup on the tiny default (float32), then the GPT-B section.
if $PY -c "$ENV_DEPS" 2>&1 | tee -a "$LOG"; then
  step 120 $PY scripts/bench_env.py --device cuda
  # every ratio at GPT-B geometry in bf16: env/bare, batched/naive oracle, head/step, PPO frames/s, memory per row
  step 240 $PY scripts/bench_env.py --device cuda --gpt-b-only --dtype bfloat16 --gpt-b-batch 16
else
  log "=== SKIPPED scripts/bench_env.py: torchrl/tensordict/gymnasium/omegaconf not importable"
fi
log "=== done in ${SECONDS}s"
