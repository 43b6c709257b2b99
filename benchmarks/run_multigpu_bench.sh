#!/usr/bin/env bash
# One 2-GPU machine call for issue 6 (multi-GPU training), under 9.5 minutes: install the carried wheels, check the
# imports, a smoke run of DDP (finechat's fast path) and FSDP-QLoRA on a tiny model including --resume from their
# checkpoints, then the measurement on the Mistral-7B architecture with random weights (python -m
# finechat.bench.multigpu, every mode a real `finechat train` run, `--gpus 2 --distributed ddp|fsdp` for the two-GPU
# ones), at the same per-GPU batch:
#   1. one GPU and DDP on two, finechat's fast path;
#   2. FSDP-QLoRA on two (plain layers: the fast path is off under FSDP), fewer steps: its target is memory;
#   3. one GPU and DDP on two with the plain layers (the rows of the 2026-11-28 run), only if time is left (before
#      2 when the fast path's DDP run failed).
# Every run records each process's step times and profiles its last step on every rank (top kernels, NCCL, host
# waits), left out of tokens/s. Results, logs and profiles go to $OUT.
#
# Here, once:   ../shared/gpu/wheels.sh xxhash==4.1.0 liger-kernel==0.8.5      (bitsandbytes, trl, datasets, ...)
# Then on the device, kind nvidia-h100-x2, carry [".whl"]:   bash benchmarks/run_multigpu_bench.sh
# Copy $OUT/multigpu-<card>-<date>.json to benchmarks/results/ afterwards.
#
# Time: DEADLINE (seconds for the whole call, 550) bounds every phase; a phase that would not fit is skipped and says
# so, and the bench writes its JSON after every mode, so what was measured is kept. Settings through the
# environment: BATCH (4), SEQ (1024), STEPS (16), WARMUP (4), LOGGING_STEPS (1), OPTIMIZER (paged_adamw_32bit; another
# one is an ablation, e.g. adamw_torch to see whether the DDP stall comes from paged memory), FSDP_STEPS (10),
# FSDP_WARMUP (3), ABLATE_OPTIMIZER (unset: a phase 1b that repeats phase 1 with this optimizer), ABLATE_OFFLOAD
# (unset; 1: a phase 1c that repeats phase 1 without activation offloading), ABLATE_NUMA (unset; 1: a phase 1e
# that repeats phase 1 with every process pinned to its GPU's NUMA node), ACCUM (unset; N: a phase 1d that repeats
# phase 1 with N micro-batches per optimizer step, ACCUM_STEPS (12) steps, ACCUM_WARMUP (2)), CHAT (unset; 1: a
# phase 1f on chat records of many lengths, with and without layer graphs, CHAT_STEPS (48), CHAT_WARMUP (24)),
# ARCH (mistral-7b),
# SMOKE=0 to skip the tiny run, BENCH=0 to stop after it, FAST=0 / FSDP=0 / PLAIN=0 to skip a phase, PLAIN_MIN
# (seconds that must be left for phase 3, 150). A warm machine keeps wheels, the random model and earlier rows of
# the same day in /tmp, so a second call can run what the first skipped (e.g. `SMOKE=0 FAST=0 FSDP=0`).
# A dry run of this whole script on a CPU machine (DDP over gloo, the tiny model; FSDP rows say it needs CUDA):
#   DEVICE=cpu SEQ=128 OUT=/tmp/mg-dry bash benchmarks/run_multigpu_bench.sh
set -uo pipefail
SECONDS=0
DEADLINE=${DEADLINE:-550}
OUT=${OUT:-/tmp/finechat-multigpu-out}
mkdir -p "$OUT"
# NVLink multicast stays off on these machines (../shared/gpu/README.md), for torchrun's processes too.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DEVICE=${DEVICE:-cuda}  # cpu: a dry run on a CPU machine (ARCH=tiny; DDP over gloo)
if [ "$DEVICE" = cpu ]; then
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}  # the CPU machine's own environment has the packages
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  ARCH=${ARCH:-tiny}
else
  export PYTHONPATH=/tmp/site:$PWD/src
  PY=python3
  # A warm machine keeps /tmp: install once.
  PYTHONPATH=/tmp/site $PY -c "import bitsandbytes, trl, datasets" 2>/dev/null \
    || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
  # the GPUs' links and CPU/NUMA affinity, and the host's NUMA layout, in the log too: the DDP gap of some machines
  # (docs/benchmarks.md, multi-GPU rounds 11-13) may come from processes or pinned buffers on the other NUMA node
  { nvidia-smi topo -m; lscpu | grep -iE "^(cpu\(s\)|thread|core|socket|numa)"; } 2>&1 | tee -a "$OUT/gpu.txt"
  $PY -c "from finechat import distributed as d; import torch
for g in range(torch.cuda.device_count()): print('GPU', g, 'NUMA-node CPUs (train --numa-binding):', d.gpu_cpus(g))" \
    2>&1 | tee -a "$OUT/gpu.txt"
fi
$PY - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt" || exit 1
import importlib.metadata as m
import os
import torch
import finechat.bench.multigpu, finechat.train, trl, datasets, bitsandbytes, accelerate  # noqa: F401 (fail fast)
names = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
print({n: m.version(n) for n in names}, "GPUs:", torch.cuda.device_count())
assert os.environ["DEVICE"] == "cpu" or torch.cuda.device_count() >= 2, "this run needs 2 GPUs"
EOF
echo "setup took ${SECONDS} s"

left() { echo $((DEADLINE - SECONDS)); }
# bench TIMEOUT ARGS...: the multigpu bench, each training run and the whole call bounded by TIMEOUT seconds.
bench() {
  local limit=$1
  shift
  timeout "$limit" $PY -m finechat bench multigpu --gpus 2 --device "$DEVICE" --timeout "$((limit - 5))" "$@"
}
# phase NAME MIN: true when at least MIN seconds are left for phase NAME (else it says why it is skipped).
phase() {
  if [ "$(left)" -lt "$2" ]; then
    echo "== $1 skipped: $(left) s left of DEADLINE=$DEADLINE, it needs about $2 s" | tee -a "$OUT/skipped.txt"
    return 1
  fi
  echo "== $1 at ${SECONDS} s"
}

if [ "${SMOKE:-1}" = 1 ] && phase "smoke (tiny model: DDP fast path, FSDP, --resume)" 60; then
  # Seconds, not minutes: the whole DDP and FSDP path (NCCL, 4-bit sharding, checkpoint, --resume) on 2 layers.
  limit=$(($(left) < 180 ? $(left) : 180))
  bench "$limit" --arch tiny --modes ddp,fsdp --fast-path --batch-size 2 --seq 256 --steps 4 --warmup 1 \
    --no-profile --resume-check --workdir /tmp/finechat-multigpu-smoke --output "$OUT/smoke.json" 2>&1 \
    | tee "$OUT/smoke.log"
  for f in /tmp/finechat-multigpu-smoke/*.log; do [ -f "$f" ] && cp "$f" "$OUT/smoke-$(basename "$f")"; done
fi

[ "${BENCH:-1}" = 1 ] || exit 0
# Kept in /tmp so that rows measured by separate phases (or calls on the same warm machine) end up in one file.
results=/tmp/finechat-multigpu/results/
common=(--arch "${ARCH:-mistral-7b}" --batch-size "${BATCH:-4}" --seq "${SEQ:-1024}" --output "$results"
  --logging-steps "${LOGGING_STEPS:-1}" --optimizer "${OPTIMIZER:-paged_adamw_32bit}")
steps=(--steps "${STEPS:-16}" --warmup "${WARMUP:-4}")
# The first phase also builds the random model once per machine (about a minute for Mistral-7B).
if [ "${FAST:-1}" = 1 ] && phase "1. single and DDP, fast path" 200; then
  bench "$(($(left) - 10))" "${common[@]}" "${steps[@]}" --modes single,ddp --fast-path 2>&1 | tee -a "$OUT/bench.log"
fi
# 1b. the same pair with another optimizer, as an ablation (rows kept beside the default's): ABLATE_OPTIMIZER=adamw_torch
# tells whether the DDP stall of rounds 2 and 3 comes from the paged optimizer's managed memory.
if [ -n "${ABLATE_OPTIMIZER:-}" ] && phase "1b. single and DDP, fast path, optimizer $ABLATE_OPTIMIZER" 150; then
  bench "$(($(left) - 10))" "${common[@]}" "${steps[@]}" --modes single,ddp --fast-path \
    --optimizer "$ABLATE_OPTIMIZER" 2>&1 | tee -a "$OUT/bench.log"
fi
# 1c. the same pair without activation offloading, as an ablation: ABLATE_OFFLOAD=1 tells whether the ~14% longer DDP
# step of rounds 6 and 7 comes from both GPUs copying activations to host memory at once.
if [ -n "${ABLATE_OFFLOAD:-}" ] && phase "1c. single and DDP, fast path, no activation offload" 150; then
  bench "$(($(left) - 10))" "${common[@]}" "${steps[@]}" --modes single,ddp --fast-path --no-offload 2>&1 \
    | tee -a "$OUT/bench.log"
fi
# 1e. the same pair with each process pinned to the CPUs of its GPU's NUMA node (train's --numa-binding), as an
# ablation: ABLATE_NUMA=1 tells whether the DDP gap of some machines comes from processes or pinned buffers on the
# far node (the topology printed above says whether there is one).
if [ -n "${ABLATE_NUMA:-}" ] && phase "1e. single and DDP, fast path, NUMA-bound processes" 150; then
  bench "$(($(left) - 10))" "${common[@]}" "${steps[@]}" --modes single,ddp --fast-path --numa-binding 2>&1 \
    | tee -a "$OUT/bench.log"
fi
# 1d. the same pair with ACCUM micro-batches per optimizer step (the shipped Mistral config has 4): DDP all-reduces,
# and its two processes wait for each other, once per ACCUM micro-batches. Rows kept beside the default's.
if [ -n "${ACCUM:-}" ] && phase "1d. single and DDP, fast path, $ACCUM micro-batches a step" 150; then
  bench "$(($(left) - 10))" "${common[@]}" --steps "${ACCUM_STEPS:-12}" --warmup "${ACCUM_WARMUP:-2}" \
    --modes single,ddp --fast-path --grad-accum "$ACCUM" 2>&1 | tee -a "$OUT/bench.log"
fi
# 1f. chat records of many lengths (padded batches of one shape per 64 tokens, as `finechat train` gets them from
# chat data): CHAT=1 runs single and DDP on the fast path, then single without the layer graphs (rows kept beside).
# The first steps of each new shape run eagerly and capture its graphs, hence more warm-up steps.
if [ -n "${CHAT:-}" ] && phase "1f. single and DDP, fast path, chat records" 200; then
  bench "$(($(left) - 10))" "${common[@]}" --steps "${CHAT_STEPS:-48}" --warmup "${CHAT_WARMUP:-24}" \
    --modes single,ddp --fast-path --chat 2>&1 | tee -a "$OUT/bench.log"
  if phase "1f. single, fast path, chat records, no layer graphs" 90; then
    bench "$(($(left) - 10))" "${common[@]}" --steps "${CHAT_STEPS:-48}" --warmup "${CHAT_WARMUP:-24}" \
      --modes single --fast-path --chat --no-cuda-graphs 2>&1 | tee -a "$OUT/bench.log"
  fi
fi
plain() {
  if [ "${PLAIN:-1}" = 1 ] && phase "3. single and DDP, plain layers" "${PLAIN_MIN:-150}"; then
    bench "$(($(left) - 10))" "${common[@]}" "${steps[@]}" --modes single,ddp 2>&1 | tee -a "$OUT/bench.log"
  fi
  PLAIN=0
}
# The fast path's kernels change often: when its DDP row failed, the plain layers' pair is what measures DDP, so it
# goes before FSDP.
fast_ddp_failed=$($PY - "$results" <<'EOF'
import json, pathlib, sys
rows = [r for p in pathlib.Path(sys.argv[1]).glob("multigpu-*.json") for r in json.loads(p.read_text())["rows"]]
print(int(any(r["mode"] == "ddp" and r.get("fast_path") and not r.get("tok_s") for r in rows)))
EOF
)
[ "${fast_ddp_failed:-0}" = 1 ] && echo "== the fast path's DDP row failed: plain layers first" && plain
if [ "${FSDP:-1}" = 1 ] && phase "2. FSDP-QLoRA" 140; then
  bench "$(($(left) - 10))" "${common[@]}" --steps "${FSDP_STEPS:-10}" --warmup "${FSDP_WARMUP:-3}" --modes fsdp \
    2>&1 | tee -a "$OUT/bench.log"
fi
plain

cp "$results"multigpu-*.json "$OUT/" 2>/dev/null
for run in /tmp/finechat-multigpu/runs/*; do
  [ -d "$run" ] || continue
  name=$(basename "$run")
  mkdir -p "$OUT/$name"
  cp "$run"/metrics.jsonl "$run"/finechat.json "$run"/adapter_config.json "$OUT/$name/" 2>/dev/null
  cp /tmp/finechat-multigpu/"$name".log "$OUT/$name/train.log" 2>/dev/null
  cp /tmp/finechat-multigpu/trace/"$name"/* "$OUT/$name/" 2>/dev/null  # step times and profiles of every rank
done
# The table of everything measured so far, from the JSON (also when a phase was cut short).
$PY - "$results" <<'EOF' 2>&1 | tee -a "$OUT/bench.log"
import json, pathlib, sys
from finechat.bench.multigpu import format_table
for path in sorted(pathlib.Path(sys.argv[1]).glob("multigpu-*.json")):
    print(format_table(json.loads(path.read_text())))
EOF
echo "whole call took ${SECONDS} s"
