"""GPU probe: the fused dropout+LoRA kernels (finechat.kernels.dropout) at Mistral-7B's 8x1024 shapes, against the
products they replace at dropout 0 (cuBLAS) and a copy of x (the card's practical bandwidth). Not a test; a
diagnosis for docs/benchmarks.md, run on an H100/H200:

    PYTHONPATH=src python3 benchmarks/probes/lora_dropout.py [output.json]

For each kernel (lora_a, lora_a_grad, lora_dx) and each adapter shape of a layer it times the launch settings the
package uses now and a sweep of others (rows per program, warps, pipeline stages; for lora_a_grad the row splits),
and prints the best. Then, for lora_a only, the cost of the mask's parts, with variants of the kernel module built
here from its source (speed only: their masks differ): Philox replaced by a 32-bit integer hash (four per Philox
call), and the permute of the draws into the documented column order left out. Per layer: the sums over a layer's
adapter inputs (q/k/v as one, o, gate and up (one shape), down). Times: triton.testing.do_bench's median (L2 flushed between
calls)."""

import importlib.util
import json
import math
import pathlib
import sys
import tempfile

import torch
from triton.testing import do_bench

from finechat.kernels import dropout
from finechat.kernels import dropout_triton as production

M = 8192
SHAPES = {"qkv": (4096, 48), "o": (4096, 16), "down": (14336, 16)}  # N, R
COUNT = {"qkv": 1, "o": 3, "down": 1}  # per layer: o, gate and up have one shape
P = 0.1
HASH_DRAWS = """
@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def draws(seed, rows, group, G, BM: tl.constexpr, Q: tl.constexpr):
    counter = (rows[:, None] * (G * Q) + group * Q + tl.arange(0, Q)[None, :]).to(tl.uint32) * 4
    base = counter + seed.to(tl.uint32) * 0x9E3779B9
    r0, r1, r2, r3 = _mix(base), _mix(base + 1), _mix(base + 2), _mix(base + 3)
    lanes = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    halves = tl.join(lanes & 0xFFFF, lanes >> 16)
    return PERMUTED
"""
PERMUTED = "tl.reshape(tl.permute(halves, (0, 3, 2, 4, 1)), (BM, 8 * Q))"
FLAT = "tl.reshape(halves, (BM, 8 * Q))"


def variant(name: str, hashed: bool, permuted: bool):
    """The kernel module with its draws replaced (a file of its own: Triton reads a kernel's source)."""
    source = pathlib.Path(production.__file__).read_text()
    start = source.index("@triton.jit\ndef draws(")
    end = source.index("@triton.jit\ndef kept(")
    body = source[start:end]
    if hashed:
        body = HASH_DRAWS
    body = body.replace(PERMUTED, PERMUTED if permuted else FLAT).replace("PERMUTED", PERMUTED if permuted else FLAT)
    path = pathlib.Path(tempfile.mkdtemp()) / f"dropout_{name}.py"
    path.write_text(source[:start] + body + "\n\n" + source[end:])
    spec = importlib.util.spec_from_file_location(f"dropout_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def launch_a(k, x, A, out, bm, warps, stages):
    N, R = x.shape[1], A.shape[0]
    args = dropout._dot_args(x, R, bm)
    seed = dropout._seed_ptr(1234, x.device)
    return lambda: k.lora_a[(cdiv(M, bm),)](
        x, A, out, M, N, R, cdiv(N, 128), dropout._threshold(P), seed, num_warps=warps, num_stages=stages, **args
    )


def launch_grad(k, g, x, bm, warps, stages, splits):
    N, R = x.shape[1], g.shape[1]
    groups = cdiv(N, 128)
    rows = cdiv(cdiv(M, splits), bm) * bm
    splits = cdiv(M, rows)
    partial = torch.empty(splits, R, N, device="cuda")
    seed = dropout._seed_ptr(1234, x.device)
    args = dropout._dot_args(x, R, bm)

    def run():
        k.lora_a_grad[(groups, splits)](
            g,
            x,
            partial,
            M,
            N,
            R,
            groups,
            rows,
            dropout._threshold(P),
            seed,
            num_warps=warps,
            num_stages=stages,
            **args,
        )
        partial.sum(0)

    return run


def launch_dx(k, g, A, out, bm, warps, stages):
    R, N = A.shape
    seed = dropout._seed_ptr(1234, g.device)
    args = dropout._dot_args(g, R, bm)
    return lambda: k.lora_dx[(cdiv(M, bm), cdiv(N, 128))](
        out, g, A, M, N, R, cdiv(N, 128), dropout._threshold(P), seed, 2.0, num_warps=warps, num_stages=stages, **args
    )


def timed(fn) -> float | None:
    try:
        return round(do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3, 1)  # µs
    except Exception as e:  # a setting that does not compile or fit
        print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", flush=True)
        return None


def shape_row(N: int, R: int, sm: int, variants: dict) -> dict:
    """One adapter shape: the times of the shipped kernels, cuBLAS, the sweeps and lora_a's variants."""
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(R, N, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
    xa = torch.empty(M, R, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    row: dict = {"N": N, "R": R}
    row["copy_x_us"] = timed(lambda: x.clone())
    row["gbps_copy"] = round(2 * x.numel() * 2 / (row["copy_x_us"] * 1e-6) / 1e9) if row["copy_x_us"] else None
    row["cublas_xA_us"] = timed(lambda: x @ A.t())
    row["cublas_gx_us"] = timed(lambda: (g.t() @ x).float())
    row["cublas_gA_us"] = timed(lambda: g @ A)
    row["shipped"] = {
        "lora_a": timed(lambda: dropout.lora_a(x, A, P, 1234)),
        "lora_a_grad": timed(lambda: dropout.lora_a_grad(g, x, P, 1234, 2.0)),
        "lora_dx": timed(lambda: dropout.lora_dx(g, A, P, 1234, 2.0)),
    }
    sweeps: dict[str, dict] = {"lora_a": {}, "lora_a_grad": {}, "lora_dx": {}}
    for bm in (16, 32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                if bm == 128 and warps == 2:
                    continue
                sweeps["lora_a"][f"bm{bm}-w{warps}-s{stages}"] = timed(
                    launch_a(production, x, A, xa, bm, warps, stages)
                )
    for bm in (32, 64, 128):
        for warps in (4, 8):
            sweeps["lora_dx"][f"bm{bm}-w{warps}-s1"] = timed(launch_dx(production, g, A, dx, bm, warps, 1))
            for stages in (2, 3):
                for per_sm in (1, 2, 4):
                    splits = max(1, min(cdiv(per_sm * sm, cdiv(N, 128)), cdiv(M, bm)))
                    sweeps["lora_a_grad"][f"bm{bm}-w{warps}-s{stages}-x{per_sm}"] = timed(
                        launch_grad(production, g, x, bm, warps, stages, splits)
                    )
    row["best"] = {}
    for kernel, times in sweeps.items():
        ok = {k: v for k, v in times.items() if v is not None}
        best = min(ok, key=ok.get)
        row["best"][kernel] = {"setting": best, "us": ok[best]}
    row["sweeps"] = sweeps
    # the mask's parts, at lora_a's best setting
    bm, warps, stages = (int(s[1:]) for s in row["best"]["lora_a"]["setting"].replace("bm", "b").split("-"))
    row["lora_a_variants_us"] = {
        v: timed(launch_a(module, x, A, xa, bm, warps, stages)) for v, module in variants.items()
    }
    return row


def main() -> None:
    out_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else None
    torch.manual_seed(0)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    result: dict = {"device": torch.cuda.get_device_name(), "M": M, "p": P, "shapes": {}, "per_layer_us": {}}
    per_layer: dict[str, float] = {}
    variants = {
        "philox+permute (as shipped)": production,
        "philox, no permute": variant("flat", False, False),
        "hash+permute": variant("hash", True, True),
        "hash, no permute": variant("hashflat", True, False),
    }
    for name, (N, R) in SHAPES.items():
        row = shape_row(N, R, sm, variants)
        result["shapes"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "sweeps"}), flush=True)
        for key, value in (
            ("shipped lora_a+lora_a_grad+lora_dx", sum(row["shipped"].values())),
            ("best settings", sum(b["us"] for b in row["best"].values())),
            ("cuBLAS at dropout 0", row["cublas_xA_us"] + row["cublas_gx_us"] + row["cublas_gA_us"]),
        ):
            per_layer[key] = per_layer.get(key, 0.0) + COUNT[name] * value
        for v, us in row["lora_a_variants_us"].items():
            per_layer[f"lora_a {v}"] = per_layer.get(f"lora_a {v}", 0.0) + COUNT[name] * (us or math.nan)
    # a step runs lora_a twice (forward, recompute), the other two once, in each of 32 layers
    result["per_layer_us"] = {k: round(v, 1) for k, v in per_layer.items()}
    print("per layer (us):", json.dumps(result["per_layer_us"]), flush=True)
    if out_path:
        out_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
