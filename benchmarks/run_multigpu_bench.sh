#!/usr/bin/env bash
# One 2-GPU machine run for issue 6 (multi-GPU training): install the carried wheels, check the imports, a quick
# smoke run of DDP and FSDP-QLoRA on a tiny model (including --resume from their checkpoints), then the measurement:
# tokens/s and peak memory per GPU of one GPU, DDP on 2 and FSDP-QLoRA on 2, at the same per-GPU batch, on the
# Mistral-7B architecture with random weights (python -m finechat.bench.multigpu). Every mode is a real
# `finechat train` run (`--gpus 2 --distributed ddp|fsdp` for the two-GPU ones). Results and logs go to $OUT.
#
# Here, once:   ../shared/gpu/wheels.sh xxhash==4.1.0      (bitsandbytes, trl, datasets and their missing deps)
# Then on the device, kind nvidia-h100-x2, carry [".whl"]:   bash benchmarks/run_multigpu_bench.sh
# Copy $OUT/multigpu-<card>-<date>.json to benchmarks/results/ afterwards.
# Settings through the environment: MODES (single,ddp,fsdp), BATCH (4), SEQ (1024), STEPS (20), WARMUP (5),
# ARCH (mistral-7b), SMOKE=0 to skip the tiny run, BENCH=0 to stop after it, FAST_PATH=1 for finechat's fused layers
# in single and ddp, RUN_TIMEOUT (seconds per training run, 420). Expected time: smoke 2-3 min, measurement 6-8 min
# (the random model is built once per machine); where one call must stay under 10 minutes, run
# `SMOKE=1 BENCH=0` first, then `SMOKE=0` (or `SMOKE=0 MODES=single` and `SMOKE=0 MODES=ddp,fsdp`) on the same warm
# machine: wheels, model and earlier rows are kept in /tmp.
set -uo pipefail
OUT=${OUT:-/tmp/finechat-multigpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off on these machines (../shared/gpu/README.md), for torchrun's processes too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=/tmp/site:$PWD/src
export DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script on a CPU machine (ARCH=tiny; DDP over gloo)
# A warm machine keeps /tmp: install once.
PYTHONPATH=/tmp/site python3 -c "import bitsandbytes, trl, datasets" 2>/dev/null \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
python3 - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
import importlib.metadata as m
import torch
import finechat.bench.multigpu, finechat.train, trl, datasets, bitsandbytes, accelerate  # noqa: F401 (fail fast)
names = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
print({n: m.version(n) for n in names}, "GPUs:", torch.cuda.device_count())
import os
assert os.environ.get("DEVICE") == "cpu" or torch.cuda.device_count() >= 2, "this run needs 2 GPUs"
EOF

fast=()
[ "${FAST_PATH:-0}" = 1 ] && fast=(--fast-path)
bench=(python3 -m finechat.bench.multigpu --gpus 2 --device "$DEVICE" --timeout "${RUN_TIMEOUT:-420}"
       ${fast[@]+"${fast[@]}"})

if [ "${SMOKE:-1}" = 1 ]; then
  SECONDS=0
  # Seconds, not minutes: the whole DDP and FSDP path (NCCL, 4-bit sharding, checkpoint, --resume) on 2 layers.
  timeout 240 "${bench[@]}" --arch tiny --modes ddp,fsdp --batch-size 2 --seq 256 --steps 4 --warmup 1 \
    --resume-check --workdir /tmp/finechat-multigpu-smoke --output "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log"
  for f in /tmp/finechat-multigpu-smoke/*.log; do [ -f "$f" ] && cp "$f" "$OUT/smoke-$(basename "$f")"; done
  echo "smoke run took ${SECONDS} s"
fi

[ "${BENCH:-1}" = 1 ] || exit 0
SECONDS=0
timeout "${BENCH_TIMEOUT:-1500}" "${bench[@]}" --arch "${ARCH:-mistral-7b}" --modes "${MODES:-single,ddp,fsdp}" \
  --batch-size "${BATCH:-4}" --seq "${SEQ:-1024}" --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" \
  --output /tmp/finechat-multigpu/results/ 2>&1 | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
echo "bench took ${SECONDS} s"
# Kept in /tmp so that modes measured by separate calls on the same warm machine end up in one file.
cp /tmp/finechat-multigpu/results/multigpu-*.json "$OUT/" 2>/dev/null
for mode in single ddp fsdp; do
  run=/tmp/finechat-multigpu/runs/$mode
  [ -d "$run" ] || continue
  mkdir -p "$OUT/$mode"
  cp "$run"/metrics.jsonl "$run"/finechat.json "$run"/config.yaml "$run"/adapter_config.json "$OUT/$mode/" 2>/dev/null
  cp /tmp/finechat-multigpu/"$mode".log "$OUT/$mode/train.log" 2>/dev/null
done
echo "bench exit status $status"
