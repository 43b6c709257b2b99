"""Fast decoding for Llama-family models (llama, mistral): a static KV cache with one slot per sequence decoded at
once, a one-sequence step that computes exactly what the model's own forward computes, a batched step with masked
attention over the slots, and CUDA graphs of both, captured once when the model loads.

The one-sequence step is captured piecewise: one graph from each attention to the next, with the attention itself
run eagerly over exactly the cached length through transformers' own SDPA call. One graph over a padded cache would
need a mask, which sends SDPA to another kernel and changes bf16 rounding, so greedy replies could drift from
`model.generate`'s; piecewise, they are the same computation. Batched steps (two or more sequences) are one graph
each, per batch size and cache-length bucket: there, every row's tokens already differ from its batch-1 rounding (the
matrix products run at another shape), as in every batching server."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from typing import Any

from finechat.kernels import decode_ops, nf4_gemv, nf4_matmul

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")
BATCH_SIZES = (2, 4, 8, 16, 32, 64)  # batched graphs are captured for these sizes (and for the slot count)
# finechat's one-row NF4 product replaces bitsandbytes' only when it is at least this much faster (timed at load)
NF4_ONE_MIN_SPEEDUP = 1.05
REPEATS = 10  # passes over the first layer's products per timed graph
# Batched steps over NF4 weights, timed at load per batch size and weight shape: finechat's product (the weight read
# once, as 4-bit; timed at each of nf4_matmul.SETTINGS), bitsandbytes' own call (from 5 rows on it may dequantize the
# whole weight), that call on pieces of NF4_PIECE_ROWS rows (the most it always multiplies straight from the 4-bit
# weight), or bitsandbytes' fused kernel called directly (nf4_matmul.bitsandbytes_kernel).
NF4_WAYS = ("bitsandbytes", "pieces", "bitsandbytes-kernel")  # and finechat's kernel, one way per nf4_matmul.SETTINGS
NF4_PIECE_ROWS = 4
MIN_LENGTH_BUCKET = 64  # batched steps attend over the cache rounded up to a power of two from here
GPU_CACHE_FRACTION = 0.4  # of the GPU memory still free after loading: the KV cache's share
CPU_CACHE_BYTES = 256 << 20
CHECK_PROMPT, CHECK_STEPS = 96, 3  # what the checks at load run: a prefill, then steps (Decoder._check_logits)
MIN_CAPACITY = 256  # fewer positions per slot than this: not worth a cache, decode step by step instead


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: Any) -> str | None:
    """Why the fast decoder cannot run this model, or None when it can."""
    lm = causal_lm(model)
    config = lm.config
    if config.model_type not in SUPPORTED:
        return f"model type {config.model_type!r} (fast decoding covers {', '.join(SUPPORTED)})"
    attention = getattr(config, "_attn_implementation", None)
    if attention != "sdpa":
        return f"attention implementation {attention!r} (fast decoding reproduces sdpa)"
    body: Any = getattr(lm, "model", None)
    if not all(hasattr(body, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"unexpected module layout of {type(lm).__name__}"
    rope = str(getattr(body.rotary_emb, "rope_type", "default"))
    if "dynamic" in rope or "longrope" in rope:
        return f"rope type {rope!r} (its frequencies change with the length)"
    return None


def plan_capacity(model: Any, slots: int, context_window: int) -> int:
    """Positions per slot: the context window, or the largest power of two whose cache for `slots` sequences fits
    the budget (GPU_CACHE_FRACTION of free GPU memory, CPU_CACHE_BYTES on CPU)."""
    import torch

    lm = causal_lm(model)
    config = lm.config
    weight = lm.model.embed_tokens.weight
    head_dim = lm.model.layers[0].self_attn.head_dim
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * weight.element_size()
    if weight.device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(weight.device)[0] * GPU_CACHE_FRACTION)
    else:
        budget = CPU_CACHE_BYTES
    fit = budget // (per_token * slots)
    capacity = context_window if fit >= context_window else 1 << max(fit.bit_length() - 1, 0)
    window = getattr(config, "sliding_window", None)
    # Within the sliding window the model attends to everything, as this decoder does.
    return min(capacity, window) if window else capacity


def avoid_cudnn_attention() -> bool:
    """Turn PyTorch's cuDNN attention backend off for this process; True if it was on.

    PyTorch prefers cuDNN attention on Hopper, and cuDNN builds an execution plan for every new sequence length.
    Measured on an H200 (torch 2.11, cuDNN chosen for the decode step): the first reply after loading decoded at
    24 tokens/s and the same reply again at 140; a 1,000-token prompt's first prefill took 69 ms, the next ones 31.
    A chat reaches new lengths with every reply, so decoding is served by flash attention, which plans nothing (vLLM
    makes the same process-wide switch). transformers' own generate in this process then uses flash as well."""
    import torch

    was_on = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return was_on


class Decoder:
    """A static KV cache of `slots` sequences of up to `capacity` positions, and the prefill and decode steps."""

    def __init__(self, model: Any, slots: int, capacity: int, fused: str = "auto"):
        """fused: "auto" runs the fused kernels when the step they compute is bit-for-bit the unfused one, "on" runs
        them whenever they work (the bench measures that way too), "off" never."""
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.lm = causal_lm(model)
        self.body = self.lm.model
        self.layers = list(self.body.layers)
        config = self.lm.config
        attention = self.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = config.num_key_value_heads
        self.slots, self.capacity = slots, capacity
        weight = self.body.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # The model's own rotary and attention functions, so the one-sequence step is its forward, op for op.
        self.apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.sdpa = sdpa_attention_forward
        self.cache_arg = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"

        def zeros(*shape: int, dtype: Any = self.dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        # Zeros, not empty: masked positions are multiplied by zero weights, and NaN garbage would survive that.
        self.keys = [zeros(slots, self.kv_heads, capacity, self.head_dim) for _ in self.layers]
        self.values = [zeros(slots, self.kv_heads, capacity, self.head_dim) for _ in self.layers]
        self.tokens = zeros(slots, 1, dtype=torch.long)
        self.positions = zeros(slots, dtype=torch.long)
        self.rows = torch.arange(slots, device=self.device)
        self.span = torch.arange(capacity, device=self.device)
        self.attn_out = zeros(1, 1, config.num_attention_heads * self.head_dim)
        self.batch_sizes = [b for b in BATCH_SIZES if b < slots] + ([slots] if slots > 1 else [])
        self.lengths = []
        n = MIN_LENGTH_BUCKET
        while n < capacity:
            self.lengths.append(n)
            n *= 2
        self.lengths.append(capacity)
        self.one_graphs: list[Any] = []  # the piecewise one-sequence step, when captured
        self.one_outputs: list[Any] = []  # q of each layer, then the logits
        self.one_inputs: list[Any] = []  # tensors the graphs read: kept referenced so no capture reuses their memory
        self.batch_graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.fused = False  # the fused kernels of finechat.kernels.decode_ops run the small ops
        self.fused_check = "off"  # what choose_fused found: off, unavailable, bitwise, differs, failed
        # With the fused kernels: one product per layer over k_proj's and v_proj's weights joined (copies), used
        # when bit-for-bit the two products (measured on an H200: 29 instead of 60 us a layer at batch 1).
        self.kv_weights: list[Any] | None = None
        self.kv_check = "off"  # what choose_fused found for the joined k/v product
        # With the fused kernels: how batched steps multiply by NF4 weights, per (rows, out features, in features):
        # one of NF4_WAYS or nf4_matmul.SETTINGS, chosen by choose_nf4_batched (on CUDA: the fastest in a timing at
        # load). bitsandbytes dequantizes a whole weight to bf16 from 5 rows on for most of Mistral-7B's shapes on an
        # H100/H200.
        self.nf4_ways: dict[tuple[int, int, int], str] = {}
        self.nf4_way = "bitsandbytes"  # for a shape or row count not in nf4_ways
        self.nf4_times: dict[str, dict[str, float]] = {}  # "rows x N x K" -> way -> microseconds per product
        self.nf4_check = "off"  # what choose_nf4_batched found: off, unavailable, timed, close, differs, failed
        # Per batch size: the nf4_matmul.SETTINGS entry that multiplies a layer's q, k and v in one launch
        # (nf4_matmul_parts), where that agrees with bitsandbytes and (on CUDA) beats their three products' time;
        # absent: three products. nf4_qkv_times: "rows" -> setting -> microseconds for the three in one launch.
        self.nf4_qkv: dict[int, str] = {}
        self.nf4_qkv_times: dict[str, dict[str, float]] = {}
        # With the fused kernels: one-row steps multiply by NF4 weights with finechat.kernels.nf4_gemv, which does
        # bitsandbytes' one-row arithmetic in its order, when its products and the step's logits are bit for bit.
        self.nf4_one = False
        self.nf4_one_check = "off"  # what choose_nf4_one found: off, unavailable, bitwise, slower, differs, failed
        self.nf4_one_speedup: float | None = None  # bitsandbytes' time over finechat's for the first layer's products
        self.nf4_one_lookup = "table"  # which of nf4_gemv.LOOKUPS the one-row steps use
        self.nf4_one_times: dict[str, float] = {}  # microseconds for the first layer's products: bitsandbytes, lookups
        if fused != "off":
            self.choose_fused(fused == "on")
        if self.fused:
            self.choose_nf4_one()
        if self.fused and slots > 1:
            self.choose_nf4_batched()

    @property
    def graphs(self) -> bool:
        """True when the steps replay CUDA graphs."""
        return bool(self.one_graphs)

    # -----------------------------------------------------------------------------------------------------------------
    # Steps

    def prefill(self, slot: int, prompt_ids: list[int]):
        """Run the prompt through the model's own forward into `slot`; the logits of its last position ([1, vocab])."""
        import torch
        from transformers import DynamicCache

        cache: Any = DynamicCache(config=self.lm.config)
        ids = torch.tensor([prompt_ids], device=self.device)
        logits = self.lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache}).logits[:, -1]
        n = len(prompt_ids)
        for i, layer in enumerate(cache.layers):
            self.keys[i][slot, :, :n].copy_(layer.keys[0])
            self.values[i][slot, :, :n].copy_(layer.values[0])
        return logits

    def prefill_many(self, slots: list[int], prompts: list[list[int]]):
        """Several prompts through one forward (right-padded, with an attention mask) into their slots; the logits of
        each one's last position ([n, vocab]). One prompt takes `prefill` (bit-for-bit the model's own prefill);
        batched rows agree with it to rounding, as batched decode rows do."""
        import torch
        from transformers import DynamicCache

        if len(prompts) == 1:
            return self.prefill(slots[0], prompts[0])
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
            mask[row, : len(prompt)] = 1
        ends = sorted({n - 1 for n in lengths})
        cache: Any = DynamicCache(config=self.lm.config)
        logits = self.lm(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=True,
            logits_to_keep=torch.tensor(ends, device=self.device),
            **{self.cache_arg: cache},
        ).logits
        rows = torch.arange(len(prompts), device=self.device)
        picked = torch.tensor([ends.index(n - 1) for n in lengths], device=self.device)
        first = slots[0]
        together = slots == list(range(first, first + len(slots)))  # as the batcher joins them: one copy a layer
        for i, layer in enumerate(cache.layers):
            if together:  # the padding's keys and values too: past each prompt's end, no step reads them
                self.keys[i][first : first + len(slots), :, :width].copy_(layer.keys)
                self.values[i][first : first + len(slots), :, :width].copy_(layer.values)
                continue
            for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
                self.keys[i][slot, :, :n].copy_(layer.keys[row, :, :n])
                self.values[i][slot, :, :n].copy_(layer.values[row, :, :n])
        return logits[rows, picked]

    def step(self, tokens: list[int], positions: list[int]):
        """Feed tokens[i] at positions[i] of slot i (slots 0..n-1); the next-token logits ([n, vocab])."""
        import torch

        n = len(tokens)
        if n == 1:
            self.tokens[:1].fill_(tokens[0])
            self.positions[:1].fill_(positions[0])
            return self._one(positions[0] + 1)
        b = next(s for s in self.batch_sizes if s >= n)
        length = next(m for m in self.lengths if m > max(positions))
        pad = [0] * (b - n)  # rows past n are unused slots: they write position 0 of their own slot
        host = torch.tensor([tokens + pad, positions + pad])
        self.tokens[:b, 0].copy_(host[0])
        self.positions[:b].copy_(host[1])
        graph = self.batch_graphs.get((b, length))
        if graph is None:
            return self._batched(b, length)[:n]
        graph[0].replay()
        return graph[1][:n]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot src into slot dst."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length].copy_(keys[src, :, :length])
            values[dst, :, :length].copy_(values[src, :, :length])

    def _one(self, length: int):
        if self.one_graphs:
            # Between the graphs only the attention runs, from Python.
            self.one_graphs[0].replay()
            for i in range(len(self.layers)):
                self._attend_into(i, self.one_outputs[i], length)
                self.one_graphs[i + 1].replay()
            return self.one_outputs[-1]
        x, cos, sin = self._embed(1)
        x, q = self._project(0, x, None, cos, sin, 1)
        for i in range(len(self.layers)):
            x, pending = self._finish_layer(i, x, self._attend(i, q, length))
            if i + 1 < len(self.layers):
                x, q = self._project(i + 1, x, pending, cos, sin, 1)
        return self._head(x, pending)

    def _batched(self, b: int, length: int):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Masked attention: the memory-efficient kernel, else plain math (cuDNN's is kept out of the graphs).
        backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
        x, cos, sin = self._embed(b)
        seen = (self.span[:length] <= self.positions[:b, None]).view(b, 1, 1, length)
        # As the additive mask SDPA makes of a boolean one, made once a step instead of in every layer (the fills
        # and copies of that took about 0.2 ms of a 16-row Mistral-7B step on an H200)
        mask = torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill_(~seen, float("-inf"))
        pending = None
        for i, layer in enumerate(self.layers):
            x, q = self._project(i, x, pending, cos, sin, b)
            # The query heads sharing a key/value head become that head's "query positions": no repeated keys.
            grouped = q.reshape(b, self.kv_heads, -1, self.head_dim)
            keys, values = self.keys[i][:b, :, :length], self.values[i][:b, :, :length]
            with sdpa_kernel(backends):
                out = torch.nn.functional.scaled_dot_product_attention(
                    grouped, keys, values, attn_mask=mask, scale=layer.self_attn.scaling
                )
            x, pending = self._finish_layer(i, x, out.reshape(b, 1, -1))
        return self._head(x, pending)

    # The pieces of the model's forward, as transformers' Llama/Mistral modules compute them. The residual stream is
    # carried as (x, pending): the layer's input is x + pending, added where the next norm reads it (one kernel when
    # fused).

    def _embed(self, b: int):
        x = self.body.embed_tokens(self.tokens[:b])
        cos, sin = self.body.rotary_emb(x, self.positions[:b, None])
        return x, cos, sin

    def _norm(self, module: Any, x, pending):
        """(x + pending, module(x + pending)), pending may be None."""
        if self.fused:  # one row: bit for bit the module; batched rows: one kernel, equal to rounding
            return decode_ops.rms_norm(module, x, pending, exact=x.shape[0] == 1)
        x = x if pending is None else x + pending
        return x, module(x)

    def _project(self, i: int, x, pending, cos, sin, b: int):
        """Residual add, input norm, q/k/v and rotary of layer i; k and v go into the cache; returns the layer's
        input and q."""
        import torch

        layer = self.layers[i]
        attention = layer.self_attn
        x, h = self._norm(layer.input_layernorm, x, pending)
        positions = self.positions[:b]
        if self.fused:
            qkv_way = self.nf4_qkv.get(b) if b > 1 else None
            if qkv_way is not None:  # q, k and v of an NF4 layer in one launch
                modules = [attention.q_proj, attention.k_proj, attention.v_proj]
                qkv = nf4_matmul.nf4_matmul_parts(h, modules, **nf4_matmul.SETTINGS.get(qkv_way, {}))
                q, k, v = qkv.split([m.weight.quant_state.shape[0] for m in modules], dim=-1)
                return x, decode_ops.rope_into_cache(q, k, v, cos, sin, positions, self.keys[i], self.values[i])
            if self.kv_weights is not None:
                kv = torch.nn.functional.linear(h, self.kv_weights[i])
                k, v = kv.split(kv.shape[-1] // 2, dim=-1)
            else:
                k, v = self._linear(attention.k_proj, h), self._linear(attention.v_proj, h)
            q = self._linear(attention.q_proj, h)
            return x, decode_ops.rope_into_cache(q, k, v, cos, sin, positions, self.keys[i], self.values[i])
        shape = (b, 1, -1, self.head_dim)
        q = attention.q_proj(h).view(shape).transpose(1, 2)
        k = attention.k_proj(h).view(shape).transpose(1, 2)
        v = attention.v_proj(h).view(shape).transpose(1, 2)
        q, k = self.apply_rotary(q, k, cos, sin)
        rows = self.rows[:b]
        self.keys[i][rows, :, positions] = k[:, :, 0]
        self.values[i][rows, :, positions] = v[:, :, 0]
        return x, q

    def _attend(self, i: int, q, length: int):
        """Slot 0's attention over exactly its `length` cached positions, through transformers' SDPA call."""
        attention = self.layers[i].self_attn
        keys, values = self.keys[i][:1, :, :length], self.values[i][:1, :, :length]
        out, _ = self.sdpa(attention, q, keys, values, None, dropout=0.0, scaling=attention.scaling)
        return out.reshape(1, 1, -1).contiguous()

    def _attend_into(self, i: int, q, length: int) -> None:
        self.attn_out.copy_(self._attend(i, q, length))

    def _finish_layer(self, i: int, x, attended):
        """The output projection and the MLP of layer i: (x after the attention's residual add, the MLP's output)."""
        layer = self.layers[i]
        x, h = self._norm(layer.post_attention_layernorm, x, self._linear(layer.self_attn.o_proj, attended))
        if self.fused:
            mlp, linear = layer.mlp, self._linear
            return x, linear(mlp.down_proj, decode_ops.silu_mul(linear(mlp.gate_proj, h), linear(mlp.up_proj, h)))
        return x, layer.mlp(h)

    def _linear(self, module: Any, h):
        """module(h); over an NF4 weight, finechat's 4-bit products where choose_nf4_one (one row) and
        choose_nf4_batched (several rows) chose them."""
        if h.shape[0] > 1:
            if nf4_matmul.applies(module):  # the way choose_nf4_batched chose (bitsandbytes' call by default)
                return self._nf4_rows(self._nf4_way(module, h.shape[0]), module, h)
        elif self.nf4_one and nf4_gemv.applies(module):
            return nf4_gemv.nf4_gemv(h, module, lookup=self.nf4_one_lookup)
        return module(h)

    def _head(self, x, pending):
        return self.lm.lm_head(self._norm(self.body.norm, x, pending)[1])[:, -1]

    # -----------------------------------------------------------------------------------------------------------------
    # Fused kernels

    def choose_fused(self, even_if_different: bool) -> None:
        """Run the small ops as fused kernels (and k/v as one product) when they can run here and, unless
        even_if_different, when a step computed with them gives bit-for-bit the logits of a step through the
        model's own modules."""
        import torch

        if not decode_ops.available(self.device) or not self._fusable():
            self.fused_check = "unavailable"
            return
        try:
            reference = self._check_logits()
            self.fused = True
            fused = self._check_logits()
        except Exception as e:  # a kernel that fails to compile or launch: decode with the modules
            self.fused, self.fused_check = False, "failed"
            log.warning("fused decode kernels failed (%s: %s); decoding with the model's modules", type(e).__name__, e)
            return
        same = all(torch.equal(a, b) for a, b in zip(reference, fused, strict=True))
        self.fused_check = "bitwise" if same else "differs"
        self.fused = same or even_if_different
        if not same:
            worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(reference, fused, strict=True))
            log.log(
                logging.INFO if self.fused else logging.WARNING,
                "fused decode kernels differ from the model's modules (largest logit difference %.3g)%s",
                worst,
                "" if self.fused else "; decoding with the modules",
            )
        if not self.fused:
            return
        self.kv_weights = self._joined_kv()
        if self.kv_weights is None:
            self.kv_check = "unavailable"
            return
        joined = self._check_logits()
        self.kv_check = "bitwise" if all(torch.equal(a, b) for a, b in zip(fused, joined, strict=True)) else "differs"
        if self.kv_check == "differs" and not even_if_different:
            self.kv_weights = None  # frees the copies
            log.info("one k/v product is not bit-for-bit two here; k and v stay two products")

    def choose_nf4_one(self) -> None:
        """Use finechat's one-row NF4 product when every NF4 product of the first layer gives bitsandbytes' bits for
        a random row, a step through it gives bit for bit the logits of a step through bitsandbytes, and (on CUDA)
        the first layer's products replayed from a CUDA graph run faster through it. Each of nf4_gemv.LOOKUPS is
        checked (the byte-permute one only on CUDA: it is PTX), and the fastest bitwise one is kept."""
        import torch

        modules = self._projections(0)
        if not all(nf4_gemv.applies(m) for m in modules) or nf4_gemv._kernel() is None:
            self.nf4_one_check = "unavailable"
            return
        gen = torch.Generator(device=self.device).manual_seed(0)
        rows = [torch.randn(1, 1, m.weight.quant_state.shape[1], generator=gen, device=self.device) for m in modules]
        rows = [x.to(self.dtype) for x in rows]
        bitwise, failed = [], []
        for lookup in nf4_gemv.LOOKUPS if self.device.type == "cuda" else ("table",):
            try:
                pairs = zip(rows, modules, strict=True)
                if all(torch.equal(nf4_gemv.nf4_gemv(x, m, lookup=lookup), m(x)) for x, m in pairs):
                    bitwise.append(lookup)
            except Exception as e:  # a kernel that fails to compile or launch: the other lookups may still run
                failed.append(lookup)
                log.warning("NF4 one-row product (%s) failed (%s: %s)", lookup, type(e).__name__, e)
        if not bitwise:
            self.nf4_one_check = "failed" if failed else "differs"
            log.info("NF4 one-row product is not bit for bit bitsandbytes' here; one-row steps use bitsandbytes")
            return
        try:
            if self.device.type == "cuda":
                self.nf4_one_times = self._nf4_one_times(modules, rows, bitwise)
                self.nf4_one_lookup = min(bitwise, key=lambda lookup: self.nf4_one_times[lookup])
                best = self.nf4_one_times[self.nf4_one_lookup]
                self.nf4_one_speedup = round(self.nf4_one_times["bitsandbytes"] / best, 3)
            else:
                self.nf4_one_lookup = bitwise[0]
            reference = self._check_logits()
            self.nf4_one = True
            same = all(torch.equal(a, b) for a, b in zip(reference, self._check_logits(), strict=True))
        except Exception as e:  # a kernel that fails to be captured: bitsandbytes runs the steps
            self.nf4_one, self.nf4_one_check = False, "failed"
            log.warning("NF4 one-row product failed (%s: %s); one-row steps use bitsandbytes", type(e).__name__, e)
            return
        if not same:
            self.nf4_one, self.nf4_one_check = False, "differs"
            log.info("NF4 one-row steps are not bit for bit bitsandbytes' here; one-row steps use bitsandbytes")
            return
        faster = self.nf4_one_speedup is None or self.nf4_one_speedup >= NF4_ONE_MIN_SPEEDUP
        self.nf4_one, self.nf4_one_check = faster, f"bitwise ({self.nf4_one_lookup})" if faster else "slower"

    def _nf4_one_times(self, modules: list[Any], rows: list[Any], lookups: list[str]) -> dict[str, float]:
        """GPU microseconds of one row through each of these modules, bitsandbytes' way and each lookup's, each
        captured in a CUDA graph of REPEATS passes (as the decode step runs them: no launch cost in the way)."""
        ways: dict[str, Any] = {"bitsandbytes": lambda x, m: m(x)}
        ways |= {lookup: functools.partial(nf4_gemv.nf4_gemv, lookup=lookup) for lookup in lookups}
        return {
            name: round(1000 * _graph_ms(lambda way=way: [way(x, m) for x, m in zip(rows, modules, strict=True)])
                        / REPEATS, 2)
            for name, way in ways.items()
        }  # fmt: skip

    def choose_nf4_batched(self) -> None:
        """How batched steps multiply by NF4 weights (not bitwise a one-row step: batched rows never are). On CUDA,
        each of the first layer's weight shapes at each captured batch size goes the fastest of NF4_WAYS and
        nf4_matmul.SETTINGS in a CUDA-graph timing, among the ways that agree with bitsandbytes' call to rounding
        ("timed"); elsewhere (no timing) finechat's product throughout, when it agrees ("close")."""
        import torch

        layer = self.layers[0]
        if not all(nf4_matmul.applies(m) for m in (layer.self_attn.q_proj, layer.mlp.down_proj)):
            self.nf4_check = "unavailable"
            return
        tolerance = 1e-5 if self.dtype == torch.float32 else 2e-2
        try:
            if self.device.type == "cuda":
                self.nf4_ways, self.nf4_check = self._fastest_nf4_ways(tolerance), "timed"
                self._choose_nf4_qkv(tolerance, timed=True)
                return
            if nf4_matmul._kernel() is None:
                self.nf4_check = "unavailable"
                return
            gen = torch.Generator(device=self.device).manual_seed(0)
            worst = 0.0
            for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
                x = torch.randn(4, 1, module.weight.quant_state.shape[1], generator=gen, device=self.device)
                got, want = nf4_matmul.nf4_matmul(x.to(self.dtype), module).float(), module(x.to(self.dtype)).float()
                worst = max(worst, ((got - want).norm() / want.norm()).item())
        except Exception as e:  # a kernel that fails to compile, launch or be captured: bitsandbytes runs them
            self.nf4_check, self.nf4_ways = "failed", {}
            log.warning("NF4 batched products failed (%s: %s); batched steps use bitsandbytes", type(e).__name__, e)
            return
        if worst >= tolerance:
            self.nf4_check = "differs"
            log.warning("NF4 batched product differs from bitsandbytes (relative error %.3g); not used", worst)
            return
        self.nf4_check, self.nf4_way = "close", "finechat"
        self._choose_nf4_qkv(tolerance, timed=False)

    def _choose_nf4_qkv(self, tolerance: float, timed: bool) -> None:
        """Fill nf4_qkv: per batch size, the setting of nf4_matmul_parts that multiplies a layer's q, k and v in one
        launch, where every layer's three weights can share one and it agrees with bitsandbytes' three calls to the
        tolerance (relative); timed (CUDA), only where the fastest such setting beats the three products' own
        chosen ways, as timed by _fastest_nf4_ways. A failure leaves the three products as they are."""
        import torch

        attention = [layer.self_attn for layer in self.layers]
        per_layer = [[a.q_proj, a.k_proj, a.v_proj] for a in attention]
        # off CUDA, the kernel's defaults (no byte permutes, no timing), as the other batched products there
        settings: dict[str, dict[str, int]] = dict(nf4_matmul.SETTINGS) if timed else {"finechat": {}}
        settings = {  # the tile widths at which every layer's three weights can share a launch
            name: setting
            for name, setting in settings.items()
            if all(nf4_matmul.groupable(layer, setting.get("bn", nf4_matmul._BN)) for layer in per_layer)
        }
        modules = per_layer[0]
        K = modules[0].weight.quant_state.shape[1]
        for rows in self.batch_sizes:
            if not 1 < rows <= nf4_matmul.MAX_ROWS:
                continue
            x = torch.randn(rows, 1, K, device=self.device).to(self.dtype)
            want = torch.cat([m(x) for m in modules], dim=-1).float()
            times: dict[str, float] = {}
            for name, setting in settings.items():
                try:
                    got = nf4_matmul.nf4_matmul_parts(x, modules, **setting).float()
                    if ((got - want).norm() / want.norm()).item() < tolerance:  # timed as _fastest_nf4_ways times
                        every = functools.partial(_each_layer_qkv, per_layer, x, setting)
                        times[name] = _graph_ms(every, repeats=1) * 1000 / len(per_layer) if timed else 0.0
                except Exception as e:  # e.g. byte permutes for float32, a setting that fails to build or launch
                    log.info("NF4 q/k/v in one product: %s unavailable (%s: %s)", name, type(e).__name__, e)
            if not times:
                continue
            best = min(times, key=times.__getitem__)
            if timed:
                self.nf4_qkv_times[str(rows)] = {name: round(t, 1) for name, t in times.items()}
                shapes = [tuple(m.weight.quant_state.shape) for m in modules]
                apart = sum(self.nf4_times[f"{rows}x{n}x{k}"][self.nf4_ways[rows, n, k]] for n, k in shapes)
                if times[best] >= apart:
                    continue
            self.nf4_qkv[rows] = best

    def _projections(self, i: int) -> list[Any]:
        """Layer i's seven projections: q, k, v, o, gate, up, down."""
        attention, mlp = self.layers[i].self_attn, self.layers[i].mlp
        return [
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ]

    @property
    def nf4_summary(self) -> str:
        """What choose_nf4_batched found; when timed, how many (batch size, weight shape) pairs go each way."""
        if self.nf4_check == "close":
            return f"close ({self.nf4_way} throughout{'; q/k/v in one product' if self.nf4_qkv else ''})"
        if self.nf4_check != "timed":
            return self.nf4_check
        chosen = list(self.nf4_ways.values())
        counts = {w: chosen.count(w) for w in dict.fromkeys(chosen)}
        summary = "timed: " + ", ".join(f"{w} {n}" for w, n in counts.items() if n) + f" of {len(self.nf4_ways)}"
        if self.nf4_qkv:
            summary += "; q/k/v in one product at " + ", ".join(f"{b} rows" for b in sorted(self.nf4_qkv))
        return summary

    def _nf4_way(self, module: Any, rows: int) -> str:
        n, k = module.weight.quant_state.shape
        return self.nf4_ways.get((rows, n, k), self.nf4_way)

    @staticmethod
    def _nf4_rows(way: str, module: Any, h):
        """h [rows, 1, K] times the module's NF4 weight, the given way (one of NF4_WAYS or nf4_matmul.SETTINGS)."""
        import torch

        if way in nf4_matmul.SETTINGS:  # finechat's kernel, at one of its timed tile settings
            return nf4_matmul.nf4_matmul(h, module, **nf4_matmul.SETTINGS[way])
        if way == "bitsandbytes-kernel":
            return nf4_matmul.bitsandbytes_kernel(h, module)
        if way == "pieces" and h.shape[0] > NF4_PIECE_ROWS:
            return torch.cat([module(h[i : i + NF4_PIECE_ROWS]) for i in range(0, h.shape[0], NF4_PIECE_ROWS)])
        return module(h)

    def _fastest_nf4_ways(self, tolerance: float) -> dict[tuple[int, int, int], str]:
        """(rows, out features, in features) -> the fastest way, for every captured batch size and every NF4 weight
        shape of the first layer, each way that agrees with bitsandbytes' call to the tolerance (relative) timed in
        a CUDA graph of one product by each weight of that shape in every layer, as a step meets them: read from
        memory, not from the L2 cache (a 4096 x 4096 NF4 weight is 8 MiB, an H200's L2 50 MiB; the timings before
        session 7 repeated the first layer's products, which stayed in L2)."""
        import torch

        shapes: dict[tuple[int, int], list[Any]] = {}
        for i in range(len(self.layers)):
            for module in self._projections(i):
                if nf4_matmul.applies(module):
                    shapes.setdefault(tuple(module.weight.quant_state.shape), []).append(module)
        ways: dict[tuple[int, int, int], str] = {}
        for rows in self.batch_sizes:
            for (n, k), same in shapes.items():
                module = same[0]
                x = torch.randn(rows, 1, k, device=self.device).to(self.dtype)
                want = module(x).float()
                candidates = [w for w in NF4_WAYS if w != "pieces" or rows > NF4_PIECE_ROWS]
                if rows <= nf4_matmul.MAX_ROWS and nf4_matmul._kernel() is not None:
                    candidates += list(nf4_matmul.SETTINGS)  # the kernel at each of its tile settings
                times = {}
                for way in candidates:
                    run = functools.partial(self._nf4_rows, way, module, x)
                    try:
                        got = run().float()
                    except Exception as e:  # e.g. no fused kernel in this bitsandbytes, a setting that fails to build
                        log.info("NF4 batched way %s unavailable (%s: %s)", way, type(e).__name__, e)
                        continue
                    if ((got - want).norm() / want.norm()).item() < tolerance:  # a way that agrees to rounding
                        every = functools.partial(self._nf4_each, way, same, x)
                        times[way] = _graph_ms(every, repeats=1) * 1000 / len(same)
                ways[rows, n, k] = min(times, key=times.__getitem__)
                self.nf4_times[f"{rows}x{n}x{k}"] = {w: round(t, 1) for w, t in times.items()}
        log.info("NF4 batched products (us per product by way): %s", self.nf4_times)
        return ways

    @classmethod
    def _nf4_each(cls, way: str, modules: list[Any], h) -> list[Any]:
        """h times each module's NF4 weight, the given way (what the timings at load replay)."""
        return [cls._nf4_rows(way, module, h) for module in modules]

    def _joined_kv(self) -> list[Any] | None:
        """Per layer, k_proj's and v_proj's weights stacked (copies), when both are plain bias-free Linear layers."""
        import torch

        modules = [(layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in self.layers]
        if not all(type(m) is torch.nn.Linear and m.bias is None for pair in modules for m in pair):
            return None
        return [torch.cat([k.weight, v.weight]) for k, v in modules]

    def _check_logits(self) -> list[Any]:
        """The logits every check at load compares, bit for bit: slot 0 after a fixed pseudo-random prompt through the
        model's own prefill, then CHECK_STEPS steps fed fixed tokens, as a reply runs. (Two steps over an empty cache,
        the check before session 6, passed a one-kernel RMSNorm whose replies on Mistral-7B then parted from
        generate's.)"""
        import torch

        steps = min(CHECK_STEPS, self.capacity // 2)
        n = min(CHECK_PROMPT, self.capacity - steps)
        ids = torch.randint(3, self.lm.config.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(0))
        self.prefill(0, ids[:n].tolist())
        return [self._check_step(int(ids[n + i]), n + i) for i in range(steps)]

    def _fusable(self) -> bool:
        """True when the layers are the plain Llama/Mistral arithmetic the kernels reproduce."""
        config = self.lm.config
        layer = self.layers[0]
        norms = [self.body.norm, layer.input_layernorm, layer.post_attention_layernorm]
        return (
            getattr(config, "hidden_act", None) in ("silu", "swish")
            and self.head_dim % 2 == 0
            and not hasattr(layer.self_attn, "q_norm")
            and all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms)
            and all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        )

    def _check_step(self, token: int, position: int):
        """Logits of slot 0 fed `token` at `position` (over what its cache holds before it)."""
        self.tokens[:1].fill_(token)
        self.positions[:1].fill_(position)
        return self._one(position + 1).clone()

    # -----------------------------------------------------------------------------------------------------------------
    # CUDA graphs

    def capture(self) -> float:
        """Capture the steps as CUDA graphs (once, at load); returns the seconds it took. A step that cannot be
        captured stays eager, with a warning."""
        import torch

        start = time.perf_counter()
        # Warm up on a side stream first (lazy cuBLAS, bitsandbytes and SDPA set-up must not happen in a capture).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._one(1)
            for b in self.batch_sizes:
                self._batched(b, self.lengths[0])
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.capture_steps(_graph, torch.cuda.graph_pool_handle())
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def capture_steps(self, graph: Any, pool: Any) -> None:
        """Record every step with graph(fn, pool) -> (replayable, outputs of fn)."""
        try:
            self._capture_one(graph, pool)
        except Exception as e:  # a capture fails with whatever the failing op raises
            self.one_graphs, self.one_outputs, self.one_inputs = [], [], []
            log.warning("one-sequence decoding stays eager: CUDA graph capture failed (%s: %s)", type(e).__name__, e)
        try:
            for b in reversed(self.batch_sizes):  # largest first, so the smaller graphs reuse its memory
                for length in reversed(self.lengths):
                    self.batch_graphs[b, length] = graph(lambda b=b, n=length: self._batched(b, n), pool)
        except Exception as e:
            self.batch_graphs = {}
            log.warning("batched decoding stays eager: CUDA graph capture failed (%s: %s)", type(e).__name__, e)

    def _capture_one(self, graph: Any, pool: Any) -> None:
        """One graph up to the first attention, one between each two attentions, one after the last."""
        n = len(self.layers)

        def first():
            x, cos, sin = self._embed(1)
            return cos, sin, *self._project(0, x, None, cos, sin, 1)

        replay, (cos, sin, x, q) = graph(first, pool)
        graphs, outputs, inputs = [replay], [q], [x, cos, sin]
        for i in range(1, n + 1):

            def between(i=i, x=x):
                y, pending = self._finish_layer(i - 1, x, self.attn_out)
                return self._project(i, y, pending, cos, sin, 1) if i < n else (y, self._head(y, pending))

            replay, (x, out) = graph(between, pool)
            graphs.append(replay)
            outputs.append(out)
            inputs.append(x)
        self.one_graphs, self.one_outputs, self.one_inputs = graphs, outputs, inputs


def _each_layer_qkv(per_layer: list[list[Any]], h, setting: dict[str, int]) -> list[Any]:
    """h times every layer's q, k and v weights, one launch a layer (what the q/k/v timing at load replays)."""
    return [nf4_matmul.nf4_matmul_parts(h, modules, **setting) for modules in per_layer]


def _graph(fn: Any, pool: Any) -> tuple[Any, Any]:
    """A CUDA graph of fn() and its outputs (static tensors that each replay overwrites)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def _graph_ms(fn: Any, repeats: int = REPEATS) -> float:
    """GPU milliseconds of one replay of a CUDA graph of `repeats` calls of fn (called once before, to compile and
    warm up), with no launch cost in the way, as the decode steps replay their products."""
    import torch

    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)
