"""GPU probe: finechat.kernels.nf4_matmul (a few rows x a double-quantized NF4 weight, the batched decode steps) at
each of its tile settings against bitsandbytes (its own dispatch, and its fused kernel called directly), at
Mistral-7B's projection shapes and 4, 8 and 16 rows. Not a test; a diagnosis, run on an H100/H200 with bitsandbytes:

    PYTHONPATH=src python3 benchmarks/probes/nf4_matmul.py

Times are per call, replayed from one CUDA graph over enough copies of the weight to exceed twice the L2 cache (as
benchmarks/probes/nf4_gemv.py times them); GB/s counts the 4-bit weight and its 8-bit scales. Each finechat row also
gives its relative error against bitsandbytes' call."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nf4_gemv import SHAPES, graph_time_us, linear4bit  # noqa: E402

from finechat.kernels import nf4_matmul  # noqa: E402

ROWS = (4, 8, 16)


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(props.name)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    for n, k in SHAPES:
        nbytes = n * k // 2 + n * k // 64
        copies = min(32, max(2, math.ceil(2 * l2 / nbytes)))
        layers = [linear4bit(n, k, torch.bfloat16, seed=1 + i) for i in range(copies)]
        for rows in ROWS:
            x = torch.randn(rows, 1, k, device="cuda").to(torch.bfloat16)
            line = [f"N={n} K={k} rows={rows}:"]
            with torch.inference_mode():
                want = layers[0](x).float()
                ways = {
                    "bitsandbytes": lambda m, x=x: m(x),
                    "bnb-kernel": lambda m, x=x: nf4_matmul.bitsandbytes_kernel(x, m),
                }
                for name, settings in nf4_matmul.SETTINGS.items():
                    ways[name] = lambda m, x=x, s=settings: nf4_matmul.nf4_matmul(x, m, **s)
                for name, way in ways.items():
                    try:
                        err = ((way(layers[0]).float() - want).norm() / want.norm()).item()
                        us = graph_time_us([lambda m=m, way=way: way(m) for m in layers])
                        line.append(f"{name} {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s, err {err:.1e})")
                    except Exception as e:  # a setting that fails to compile or launch: say so and go on
                        line.append(f"{name} failed ({type(e).__name__}: {str(e)[:120]})")
            print("  ".join(line), flush=True)
        del layers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
