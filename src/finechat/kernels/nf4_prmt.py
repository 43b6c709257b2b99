"""NF4 code values looked up by byte permutes (PTX `prmt`), as inline assembly for the Triton kernels of
finechat.kernels.nf4_gemv and finechat.kernels.nf4_matmul, and the same instructions run in Python for the CPU tests.

Why: both kernels were bound by instruction issue, not memory. bitsandbytes' one-row kernel and finechat's copy of it
ran at ~1 TB/s on an H200 (a quarter of its bandwidth; round 3 in docs/benchmarks.md) with two float conversions and
a table load per weight, and the batched kernel's tree of selects costs ~19 instructions per weight (round 5). Here
eight weights (one 32-bit word of packed nibbles) take 22 integer instructions to look up, and a one-row product's
bf16 arithmetic runs on packed pairs (`mul.rn.bf16x2`), which rounds exactly as bitsandbytes' float multiply then
round to bf16 does: both operands are 16-bit, so the float32 product is exact and there is one rounding either way.

The lookup: each 16-bit code value is split into its high and low bytes, giving two 16-byte tables ("planes") held
in four 32-bit registers each. `prmt` picks 4 bytes out of 8 by 4 nibbles of its selector, so a 16-byte plane takes
two permutes (entries 0-7 and 8-15) and a third that keeps, per nibble, the one its bit 3 asks for. Two more permutes
interleave the planes' bytes into pairs of code values. A program here is a list of such instructions over named
32-bit registers; `ptx` writes it as PTX for `tl.inline_asm_elementwise` (pack=4: four bytes of packed weights per
call, the byte order Triton packs them in), and `run` executes it with numpy on the CPU, where the tests compare it
with the arithmetic of finechat.kernels.nf4_gemv's emulation. The PTX has to be right on the GPU as well: the decoder
checks the kernels against bitsandbytes bit for bit (one row) or to rounding (batched) at load."""

from __future__ import annotations

import functools

import numpy as np
import torch

Op = tuple[str, ...]  # (operation, destination, sources...): a register name, a "$n" operand or a 32-bit constant
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


def _lookup(word: str, planes: dict[str, list[str]], pairs: dict[str, str]) -> list[Op]:
    """Look up the 8 nibbles of `word`: 4 bytes, each holding an even weight in its high nibble and the next, odd
    weight in its low one. planes names the registers of the two tables; pairs maps result registers to the prmt
    selector that gathers their two code values from bytes 0-1 of the word (names ending in "+" take the same from
    bytes 2-3)."""
    ops: list[Op] = [
        ("and", "sel", word, "0x77777777"),  # entry within a half of the plane (prmt reads bit 3 as 'sign fill')
        ("shr", "half", word, "1"),  # bit 3 of each nibble to bit 2: picks the second operand's bytes (4-7)
        ("and", "half", "half", "0x44444444"),
        ("or", "half", "half", "0x32103210"),  # output byte i from byte i of the low-entries or high-entries lookup
        ("shr", "sel_hi", "sel", "16"),  # prmt reads its selector's low 16 bits: bytes 2-3 need their own
        ("shr", "half_hi", "half", "16"),
    ]
    for part, (sel, half) in enumerate((("sel", "half"), ("sel_hi", "half_hi"))):
        for plane, (r0, r1, r2, r3) in planes.items():  # nibbles (odd, even, odd, even) -> 4 bytes of that plane
            ops += [
                ("prmt", "low", r0, r1, sel),  # entries 0-7
                ("prmt", "high", r2, r3, sel),  # entries 8-15
                ("prmt", f"{plane}_bytes", "low", "high", half),
            ]
        ops += [
            ("prmt", dst.rstrip("+"), "lo_bytes", "hi_bytes", selector)
            for dst, selector in pairs.items()
            if dst.endswith("+") == (part == 1)
        ]
    return ops


# prmt selectors over (low plane's bytes, high plane's bytes) = bytes 0-3 and 4-7, for nibbles in the order
# (odd weight of byte 0, even of byte 0, odd of byte 1, even of byte 1): the output's low half first
_EVEN = "0x7351"  # the even weights of bytes 0 and 1 (bytes 1, 5 then 3, 7)
_ODD = "0x6240"  # the odd weights of bytes 0 and 1 (bytes 0, 4 then 2, 6)
_BYTE0 = "0x4051"  # byte 0's even then odd weight (bytes 1, 5 then 0, 4)
_BYTE1 = "0x6273"  # byte 1's even then odd weight (bytes 3, 7 then 2, 6)


def plane_words(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The 16 code values rounded to dtype as two byte planes, 4 little-endian 32-bit words each (high bytes first),
    signed as a kernel's int32 arguments."""
    bits = code.float().to(dtype).view(torch.int16).tolist()
    words = []
    for shift in (8, 0):
        entry = [(b >> shift) & 0xFF for b in bits]
        for i in range(4):
            word = sum(entry[4 * i + j] << (8 * j) for j in range(4))
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
    return words


_PLANES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def planes(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """plane_words on code's device, once per lane ([32 * 8] int32: the one-row kernel loads its lane's copy into
    registers); one table per device and dtype, since NF4's 16 code values are the same in every weight (the
    decoder's checks at load compare the results with bitsandbytes' on the real weights)."""
    key = (code.device, dtype)
    if key not in _PLANES:
        words = torch.tensor(plane_words(code.cpu(), dtype), dtype=torch.int32)
        _PLANES[key] = words.repeat(32).to(code.device)
    return _PLANES[key]


def codes_program() -> list[Op]:
    """The code values of 4 packed bytes: outputs $0, $1 the even weights (high nibbles) of bytes 0-1 and 2-3 as
    pairs of dtype, $2, $3 the odd ones; inputs $4 the 4 bytes, $5..$12 plane_words."""
    planes = {"hi": ["$5", "$6", "$7", "$8"], "lo": ["$9", "$10", "$11", "$12"]}
    return _lookup("$4", planes, {"$0": _EVEN, "$2": _ODD, "$1+": _EVEN, "$3+": _ODD})


def row_program() -> list[Op]:
    """bitsandbytes' one-row arithmetic over one 32-bit word of packed weights (4 bytes, 8 weights): per byte in
    order, each weight is code * scale rounded to dtype, each product with x rounded to dtype, the two products are
    added in float32 and that sum is added to the running float32 sum. Output $0 the sum after the 4 bytes; inputs
    $1 the sum before, $2 the word, $3..$6 x at the bytes' weights (pairs of dtype, even weight in the low half), $7
    the block scale twice (a pair of dtype), $8..$15 plane_words."""
    planes = {"hi": ["$8", "$9", "$10", "$11"], "lo": ["$12", "$13", "$14", "$15"]}
    ops = _lookup("$2", planes, {"w0": _BYTE0, "w1": _BYTE1, "w2+": _BYTE0, "w3+": _BYTE1})
    total = "$1"
    for p in range(4):
        ops += [
            ("mul2", "w", f"w{p}", "$7"),
            ("mul2", "product", "w", f"${3 + p}"),
            ("f32_low", "a", "product"),
            ("f32_high", "b", "product"),
            ("add_f32", "pair", "a", "b"),
            ("add_f32", "$0" if p == 3 else "total", total, "pair"),
        ]
        total = "total"
    return ops


# ---------------------------------------------------------------------------------------------------------------------
# As PTX


def ptx(ops: list[Op], dtype: torch.dtype) -> str:
    """The program as one PTX block for tl.inline_asm_elementwise: its own registers, declared in a scope."""
    kind = DTYPES[dtype]
    regs = sorted({r for op in ops for r in op[1:] if not r.startswith(("$", "0x")) and not r.isdigit()})
    lines = ["{", f".reg .b32 {', '.join(_reg(r) for r in regs)};", ".reg .b16 %lo16, %hi16;"]
    for name, dst, *src in ops:
        if name in ("and", "or", "shr", "prmt"):
            op = {"shr": "shr.u32", "prmt": "prmt.b32"}.get(name, f"{name}.b32")
            lines.append(f"{op} {', '.join(_reg(r) for r in (dst, *src))};")
        elif name == "mul2":
            lines.append(f"mul.rn.{kind}x2 {_reg(dst)}, {_reg(src[0])}, {_reg(src[1])};")
        elif name == "add_f32":  # .rn: never contracted into a multiply-add
            lines.append(f"add.rn.f32 {_reg(dst)}, {_reg(src[0])}, {_reg(src[1])};")
        elif kind == "bf16":  # a bf16 value is the high 16 bits of the float32 of the same value
            if name == "f32_low":
                lines.append(f"shl.b32 {_reg(dst)}, {_reg(src[0])}, 16;")
            else:
                lines.append(f"and.b32 {_reg(dst)}, {_reg(src[0])}, 0xFFFF0000;")
        else:
            half = "%lo16" if name == "f32_low" else "%hi16"
            lines += [f"mov.b32 {{%lo16, %hi16}}, {_reg(src[0])};", f"cvt.f32.f16 {_reg(dst)}, {half};"]
    lines.append("}")
    return "\n".join(lines)


def _reg(name: str) -> str:
    return name if name.startswith(("$", "0x")) or name.isdigit() else f"%{name}"


@functools.cache
def row_ptx(dtype: torch.dtype) -> str:
    """row_program as PTX for dtype (bfloat16 or float16)."""
    return ptx(row_program(), dtype)


@functools.cache
def codes_ptx(dtype: torch.dtype) -> str:
    """codes_program as PTX for dtype."""
    return ptx(codes_program(), dtype)


# ---------------------------------------------------------------------------------------------------------------------
# On the CPU: the same instructions over numpy arrays of uint32 (one element per call of the block)


def run(ops: list[Op], dtype: torch.dtype, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute the program: inputs and the result map "$n" to uint32 arrays of one shape (float32 results as bits)."""
    regs: dict[str, np.ndarray] = {k: np.asarray(v, dtype=np.uint32) for k, v in inputs.items()}

    def val(r: str) -> np.ndarray:
        if r.startswith("0x") or r.isdigit():
            return np.asarray(int(r, 0), dtype=np.uint32)
        return regs[r]

    for name, dst, *src in ops:
        a = val(src[0])
        if name == "and":
            out = a & val(src[1])
        elif name == "or":
            out = a | val(src[1])
        elif name == "shr":
            out = a >> val(src[1])
        elif name == "prmt":
            out = _prmt(a, val(src[1]), val(src[2]))
        elif name == "mul2":
            b = val(src[1])
            out = _mul_half(a & 0xFFFF, b & 0xFFFF, dtype) | (_mul_half(a >> 16, b >> 16, dtype) << 16)
        elif name == "f32_low":
            out = _to_f32_bits(a & 0xFFFF, dtype)
        elif name == "f32_high":
            out = _to_f32_bits(a >> 16, dtype)
        elif name == "add_f32":
            out = (a.view(np.float32) + val(src[1]).view(np.float32)).view(np.uint32)
        else:
            raise ValueError(f"unknown operation {name}")
        regs[dst] = np.asarray(out, dtype=np.uint32)
    return {k: v for k, v in regs.items() if k.startswith("$")}


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode): output byte i is byte (c >> 4i) & 7 of {b, a}, its sign repeated if bit 3 is set."""
    source = (np.asarray(b, dtype=np.uint64) << 32) | np.asarray(a, dtype=np.uint64)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for i in range(4):
        nibble = (np.asarray(c, dtype=np.uint32) >> (4 * i)) & 0xF
        byte = ((source >> ((nibble & 7) * 8).astype(np.uint64)) & 0xFF).astype(np.uint32)
        byte = np.where(nibble & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint32) << (8 * i)
    return out


def _half_to_f32(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint32)
    if dtype == torch.bfloat16:
        return (bits << 16).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def _to_f32_bits(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return _half_to_f32(bits, dtype).view(np.uint32)


def _mul_half(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The product of two 16-bit floats, rounded once to their type (float64 holds it exactly), as 16-bit patterns."""
    exact = _half_to_f32(a, dtype).astype(np.float64) * _half_to_f32(b, dtype).astype(np.float64)
    rounded = torch.from_numpy(exact).to(dtype).view(torch.int16).numpy()
    return rounded.astype(np.uint16).astype(np.uint32)
