"""GPU probe: how many warp instructions per clock an SM issues of each kind the NF4 byte-permute kernels use (prmt,
lop3, shifts, integer and bf16 multiplies, float adds). Not a test; a diagnosis for docs/benchmarks.md, where the
one-row kernel issues at ~57% of the SM's rate and 64 of its 228 loop instructions are prmt:

    PYTHONPATH=src python3 benchmarks/probes/alu_rates.py

Each kernel runs CHAINS independent chains of one instruction kind in a loop (no chain waits on another, so latency
is hidden), on enough warps to fill every SM, and prints warp instructions per clock per SM (4 is one per cycle on
each of Hopper's four schedulers) next to the time per call. Clock: the card's maximum SM clock (nvidia-smi's
clocks.max.sm), so the rates are lower bounds where the card ran slower."""

import subprocess

import torch
import triton
import triton.language as tl

ITERS = 2048
CHAINS = 8  # independent registers per thread, each updated once per loop step
WARPS = 4
KINDS = {
    "prmt": "prmt.b32 {d}, {a}, {b}, {c};",
    "lop3": "lop3.b32 {d}, {a}, {b}, {c}, 0x96;",
    "funnel shift": "shf.r.wrap.b32 {d}, {a}, {b}, {c};",
    "imad": "mad.lo.u32 {d}, {a}, {b}, {c};",
    "bf16x2 mul": "mul.rn.bf16x2 {d}, {a}, {b};",
    "f32 add": "add.rn.f32 {d}, {a}, {b};",
}


def body(template: str) -> str:
    """One loop step: every chain i updated from itself and its two neighbours (outputs $0..$7, inputs $8..$15)."""
    lines = []
    for i in range(CHAINS):
        a, b, c = (f"${CHAINS + (i + k) % CHAINS}" for k in range(3))
        lines.append(template.format(d=f"${i}", a=a, b=b, c=c))
    return "\n".join(lines)


@triton.jit
def spin(out_ptr, ITERS: tl.constexpr, ASM: tl.constexpr):
    i = tl.program_id(0) * (32 * 4) + tl.arange(0, 32 * 4)
    r0, r1, r2, r3 = i, i * 3 + 1, i ^ 0x5555, i + 7
    r4, r5, r6, r7 = i * 5 + 2, i ^ 0x3333, i + 11, i * 7 + 3
    for _ in range(ITERS):
        r0, r1, r2, r3, r4, r5, r6, r7 = tl.inline_asm_elementwise(
            ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [r0, r1, r2, r3, r4, r5, r6, r7],
            dtype=(tl.int32,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
    tl.store(out_ptr + i, r0 ^ r1 ^ r2 ^ r3 ^ r4 ^ r5 ^ r6 ^ r7)


def max_sm_clock_hz() -> float:
    query = ["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"]
    return float(subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0]) * 1e6


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    sms, clock = props.multi_processor_count, max_sm_clock_hz()
    programs = sms * 16  # 64 warps an SM at 4 warps a program: every scheduler busy
    out = torch.empty(programs * 32 * WARPS, dtype=torch.int32, device="cuda")
    print(f"{props.name}: {sms} SMs, max SM clock {clock / 1e6:.0f} MHz, {CHAINS} chains x {ITERS} steps a thread")
    for name, template in KINDS.items():
        asm = body(template)
        spin[(programs,)](out, ITERS=ITERS, ASM=asm, num_warps=WARPS)  # compile and warm up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            spin[(programs,)](out, ITERS=ITERS, ASM=asm, num_warps=WARPS)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 5
        warp_instructions = programs * WARPS * ITERS * CHAINS
        rate = warp_instructions / (seconds * clock * sms)
        print(f"  {name:<12} {seconds * 1e6:9.1f} us   {rate:5.2f} warp instructions / clock / SM")


if __name__ == "__main__":
    main()
