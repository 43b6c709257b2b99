"""GPU probe: finechat.kernels.nf4_gemv (one row x a double-quantized NF4 weight) against bitsandbytes' own one-row
product, at Mistral-7B's projection shapes. Not a test; a diagnosis, run on an H100/H200 with bitsandbytes installed:

    PYTHONPATH=src python3 benchmarks/probes/nf4_gemv.py

Per shape it prints how many outputs of the PyTorch emulation and of the Triton kernel equal bitsandbytes' bit for
bit (bf16, a few inputs; fp16 on the first shape) and the largest difference where they do not, then the time per
call of bitsandbytes' Linear4bit, the Triton kernel with each of nf4_gemv.LOOKUPS at a few (BN, num_warps) settings, the batched-step kernel
(finechat.kernels.nf4_matmul) at one row, and cuBLAS on the bf16 weight.
Times are per call over 200 calls replayed from one CUDA graph (the decode steps run as graphs; launched one by one
from Python, the launches would be timed instead), cycling through enough copies of the weight to exceed twice the
L2 cache, so that each call reads its weight from memory as a decode step does. GB/s counts the bytes a call must
read: the 4-bit weight and its 8-bit block scales for NF4, the 16-bit weight for cuBLAS."""

import functools
import math

import bitsandbytes as bnb
import torch
import triton

from finechat.kernels import nf4_gemv, nf4_matmul

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (N, K): q/o, k/v, gate/up, down
SETTINGS = [(4, 4), (2, 2), (8, 8), (8, 4), (1, 1)]  # (BN, num_warps) of the Triton kernel
CALLS = 200


def linear4bit(N: int, K: int, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A bitsandbytes Linear4bit holding a random double-quantized NF4 weight, on CUDA."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(N, K, device="cuda", generator=gen) * 0.02).to(dtype)
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.cuda()  # bitsandbytes quantizes on the move (as finechat's tests build theirs)


def inputs(K: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Activations of a few kinds: plain, larger, and with a few outlier channels."""
    gen = torch.Generator(device="cuda").manual_seed(K)
    plain = torch.randn(1, 1, K, device="cuda", generator=gen)
    outliers = plain.clone()
    outliers[..., torch.randint(0, K, (8,), device="cuda", generator=gen)] *= 50
    return [t.to(dtype) for t in (plain, plain * 8, outliers)]


def compare(name: str, got: torch.Tensor, want: torch.Tensor) -> tuple[int, int]:
    same = (got.view(torch.int16) == want.view(torch.int16)).sum().item()
    if same < want.numel():
        diff = (got.float() - want.float()).abs()
        i = int(diff.argmax())
        print(f"    {name}: {want.numel() - same} of {want.numel()} differ; largest |diff| {diff.max().item():.4g} "
              f"at output {i} ({got.flatten()[i].item():.6g} vs {want.flatten()[i].item():.6g})")  # fmt: skip
    return same, want.numel()


def check_bits(N: int, K: int, dtype: torch.dtype) -> str:
    layer = linear4bit(N, K, dtype, seed=0)
    assert nf4_gemv.applies(layer), "nf4_gemv.applies is False for a plain Linear4bit"
    ways = {"emulation": nf4_gemv.nf4_gemv_emulated}
    ways |= {f"triton-{lookup}": functools.partial(nf4_gemv.nf4_gemv, lookup=lookup) for lookup in nf4_gemv.LOOKUPS}
    counts = {name: [0, 0] for name in ways}
    with torch.inference_mode():
        for x in inputs(K, dtype):
            want = layer(x)
            for name, fn in ways.items():
                try:
                    got = fn(x, layer)
                except Exception as e:  # a kernel that fails to compile: say so and go on
                    print(f"    {name} failed: {type(e).__name__}: {str(e)[:400]}")
                    continue
                same, total = compare(name, got, want)
                counts[name][0] += same
                counts[name][1] += total
    return ", ".join(f"{name} {same}/{total} equal" for name, (same, total) in counts.items())


def graph_time_us(calls: list) -> float:
    """Time per call of `calls` (cycled CALLS times) replayed from one CUDA graph."""
    for call in calls:  # warm-up: compiles, autotunes, allocates
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (5 * CALLS)


def timings(N: int, K: int, dtype: torch.dtype) -> list[str]:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    nf4_bytes = N * K // 2 + N * K // 64  # 4-bit weights + one 8-bit scale per 64 (the float32 second level is tiny)
    dense_bytes = N * K * 2
    copies = min(32, max(2, math.ceil(2 * l2 / nf4_bytes)))
    layers = [linear4bit(N, K, dtype, seed=1 + i) for i in range(copies)]
    x = inputs(K, dtype)[0]
    rows = []

    def line(name: str, us: float, nbytes: int) -> str:
        return f"{name} {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s)"

    with torch.inference_mode():
        rows.append(line("bitsandbytes", graph_time_us([lambda m=m: m(x) for m in layers]), nf4_bytes))
        for lookup in nf4_gemv.LOOKUPS:
            for bn, warps in SETTINGS:
                name = f"triton-{lookup} BN={bn}/w{warps}"
                try:
                    gemv = functools.partial(nf4_gemv.nf4_gemv, bn=bn, num_warps=warps, lookup=lookup)
                    us = graph_time_us([lambda m=m, gemv=gemv: gemv(x, m) for m in layers])
                    rows.append(line(name, us, nf4_bytes))
                except Exception as e:
                    rows.append(f"{name} failed ({type(e).__name__}: {str(e)[:200]})")
        try:  # the batched-step kernel at one row: not bitsandbytes' bits, but how fast a non-exact path could be
            us = graph_time_us([lambda m=m: nf4_matmul.nf4_matmul(x, m) for m in layers])
            rows.append(line("nf4_matmul at 1 row (not bitwise)", us, nf4_bytes))
        except Exception as e:
            rows.append(f"nf4_matmul at 1 row failed ({type(e).__name__}: {str(e)[:200]})")
        del layers
        dense_copies = min(32, max(2, math.ceil(2 * l2 / dense_bytes)))
        weights = [(torch.randn(N, K, device="cuda") * 0.02).to(dtype) for _ in range(dense_copies)]
        us = graph_time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])
        rows.append(line("cuBLAS bf16" if dtype == torch.bfloat16 else "cuBLAS fp16", us, dense_bytes))
    return rows


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bnb.__version__}")
    summary = []
    for i, (N, K) in enumerate(SHAPES):
        print(f"N={N} K={K}")
        bits = check_bits(N, K, torch.bfloat16)
        print(f"  bf16 bits: {bits}")
        if i == 0:
            print(f"  fp16 bits: {check_bits(N, K, torch.float16)}")
        times = timings(N, K, torch.bfloat16)
        for row in times:
            print(f"  {row}")
        summary.append(f"{N}x{K}: {bits}; " + "; ".join(times))
    print("\nsummary")
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
