"""finechat's fast training path for Llama-family decoders (Llama, Mistral, Qwen2) on CUDA.

`prepare(model)` replaces each decoder layer of a loaded base model by a FastDecoderLayer that holds the same
submodules under the same names (state dicts, peft targeting and saving are unchanged) and, when training, computes
the layer with fused operations from finechat.kernels and checkpoints it with its input offloaded to host memory
(finechat.offload); at batches the layer graphs leave eager it keeps the attention half of the first pass in host
memory too, instead of recomputing it (offload.Kept). In eval mode, or with a KV cache, it calls the original
layer. Nothing is patched: no class or third-party function is modified, and the model stays a plain transformers
model.

What it leaves out against the seed recipe (prepare_model_for_kbit_training + HF gradient checkpointing + peft):
the float32 upcast of norms, embeddings and head; the float32 LoRA detour; peft's clone and elementwise adds;
HF checkpointing's GPU-resident layer inputs. Same loss and LoRA gradients within bf16 rounding:
tests/test_fastpath.py checks it on CPU (float32) and on CUDA (bf16, NF4)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finechat import kernels, packing
from finechat.kernels import dropout as dropout_ops
from finechat.kernels import lora_linear as lora_ops
from finechat.kernels import nf4
from finechat.kernels.lora_linear import AdapterProduct, lora_adapter, lora_linear, lora_linears
from finechat.kernels.rms_norm import rms_norm
from finechat.kernels.rope import apply_rope
from finechat.kernels.swiglu import swiglu
from finechat.layer_graphs import MAX_SHAPES, LayerGraphs
from finechat.offload import Kept, Offloader, Passes, checkpoint
from finechat.packing import Segments

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
# The recompute skips the down projection's product (FastDecoderLayer._layer's output=False); switched off by
# `finechat bench train` (finechat-fullrecompute) to measure what that buys.
ENABLED = {"skip_last_product": True}
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unsupported_reason(model: nn.Module, require_cuda: bool = True) -> str | None:
    """Why the fast path cannot run this model here (None when it can)."""
    if require_cuda and not torch.cuda.is_available():
        return "no CUDA device"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} (supported: {', '.join(MODEL_TYPES)})"
    if getattr(config, "_attn_implementation", "sdpa") != "sdpa":
        return f"attention implementation {config._attn_implementation!r} (supported: sdpa)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_dropout", 0.0):
        return "activation other than silu, or attention dropout"
    layers = _decoder_layers(model)
    if layers is None:
        return "no decoder layer list found"
    for layer in layers:
        if isinstance(layer, FastDecoderLayer):
            continue
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in _ATTN):
            return "decoder layers without self_attn.{q,k,v,o}_proj"
        if not all(hasattr(mlp, n) for n in _MLP) or hasattr(attn, "q_norm"):
            return "decoder layers other than Llama-style (gate/up/down MLP, no q/k norm)"
    return None


def padding_is_causal(model: nn.Module, max_length: int) -> bool:
    """Whether a right-padded batch of at most max_length tokens gives its real tokens the same attention without
    its padding mask, i.e. plain causal attention: true unless a sliding window shorter than max_length applies
    (then the mask carries the window too). With right padding every real token sits before the padding, so causal
    attention never lets it see a pad; the pads' own outputs differ, and their labels are ignored. Without the mask
    the fast path's layers take the flash kernel without repeating the KV heads, and (at small batches) CUDA graphs."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return True
    return window >= max_length


def supported(model: nn.Module) -> bool:
    """True when the fast path runs this model on this machine (CUDA and a Llama-family decoder)."""
    return unsupported_reason(model) is None


def prepare(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    require_cuda: bool = True,
    offload: bool = True,
    cuda_graphs: bool = True,
    cuda_graph_backward: bool = True,
    cuda_graph_shapes: int = MAX_SHAPES,
    keep_attention: bool = True,
) -> nn.Module:
    """Make a freshly loaded base model ready for LoRA training on the fast path (in place; returns it).

    Freezes the base weights, keeps them in their loaded dtype, and swaps in FastDecoderLayers that checkpoint with
    offloading when gradient_checkpointing is on. Apply LoRA (peft) afterwards, as after
    prepare_model_for_kbit_training. require_cuda=False runs it on CPU, for tests of the arithmetic; offload=False
    keeps the checkpoints on the GPU; cuda_graphs=False runs the checkpointed forwards eagerly instead of replaying
    them as CUDA graphs at small batches (finechat.layer_graphs); cuda_graph_backward=False replays only
    the forwards, leaving each layer's recompute and backward to autograd op by op; cuda_graph_shapes: the most
    batch shapes whose graphs are kept; keep_attention: the eager layers keep their attention half from the first pass
    in pinned host memory (within Offloader.host_budget) instead of recomputing it in backward."""
    reason = unsupported_reason(model, require_cuda=require_cuda)
    if reason is not None:
        raise ValueError(f"finechat fast path: unsupported {reason}; train with --no-fast-path")
    for param in model.parameters():
        param.requires_grad_(False)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    layers = _decoder_layers(model)
    assert layers is not None
    offloader = Offloader(enabled=offload)
    offloader.layers, offloader.keeping = len(layers), keep_attention
    graphs = LayerGraphs(enabled=cuda_graphs, backward_enabled=cuda_graph_backward, max_shapes=cuda_graph_shapes)
    for i, layer in enumerate(layers):
        fast = layer if isinstance(layer, FastDecoderLayer) else FastDecoderLayer(layer, i, offloader, graphs)
        fast.gradient_checkpointing = gradient_checkpointing
        layers[i] = fast
    log.info(
        "fast training path: %d fused decoder layers, offloaded checkpointing %s, CUDA graphs %s",
        len(layers),
        gradient_checkpointing,
        cuda_graphs,
    )
    return model


def set_options(
    model: nn.Module,
    offload: bool | None = None,
    gradient_checkpointing: bool | None = None,
    cuda_graphs: bool | None = None,
    cuda_graph_backward: bool | None = None,
    cuda_graph_shapes: int | None = None,
    keep_attention: bool | None = None,
) -> None:
    """Switch offloading, checkpointing, CUDA graphs or the kept attention of a prepared model's fast layers (None
    leaves a setting)."""
    for layer in _decoder_layers(model) or []:
        if isinstance(layer, FastDecoderLayer):
            if offload is not None:
                layer._offloader.enabled = offload
            if keep_attention is not None:
                layer._offloader.keeping = keep_attention
            if gradient_checkpointing is not None:
                layer.gradient_checkpointing = gradient_checkpointing
            if cuda_graphs is not None:
                layer._graphs.enabled = cuda_graphs
                layer._graphs.clear()
            if cuda_graph_backward is not None:
                layer._graphs.backward_enabled = cuda_graph_backward
                layer._graphs.clear()
            if cuda_graph_shapes is not None:
                layer._graphs.max_shapes = cuda_graph_shapes
                layer._graphs.clear()


def offloader(model: nn.Module) -> Offloader | None:
    """The checkpoint offloader of a prepared model's fast layers (None when it has none)."""
    first = _first_fast_layer(model)
    return first._offloader if first is not None else None


def layer_graphs(model: nn.Module) -> LayerGraphs | None:
    """The CUDA graphs of a prepared model's fast layers (None when it has none)."""
    first = _first_fast_layer(model)
    return first._graphs if first is not None else None


def _first_fast_layer(model: nn.Module) -> FastDecoderLayer | None:
    """The first FastDecoderLayer of a prepared model (they share their offloader and graphs), or None."""
    return next((layer for layer in _decoder_layers(model) or [] if isinstance(layer, FastDecoderLayer)), None)


class FastDecoderLayer(nn.Module):
    """A Llama-family decoder layer computed with fused ops while training; the original layer otherwise.

    It registers the original layer's children under their own names, so parameter names are those of the
    original model, and it answers attribute look-ups it cannot (attention_type, ...) from the original layer."""

    def __init__(self, layer: nn.Module, index: int, offloader: Offloader, graphs: LayerGraphs | None = None) -> None:
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self._plain = (layer,)  # a tuple keeps the original out of the module tree (no duplicate parameters)
        self._offloader = offloader
        self._graphs = graphs if graphs is not None else LayerGraphs(enabled=False)
        self.layer_index = index
        self.gradient_checkpointing = False  # transformers' gradient_checkpointing_enable() sets this flag
        attn: Any = layer.self_attn
        self._head_dim: int = attn.head_dim
        self._kv_groups: int = attn.num_key_value_groups
        self._scaling: float = attn.scaling
        config = getattr(attn, "config", None)
        heads = getattr(config, "num_attention_heads", 0)
        # the widths of q, k and v, for what keeping the attention costs in host memory (_keeps)
        self._widths = (heads * self._head_dim, 2 * heads // max(self._kv_groups, 1) * self._head_dim)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            plain = self.__dict__.get("_plain")
            if plain is None:
                raise
            return getattr(plain[0], name)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (
            not (self.training and torch.is_grad_enabled())
            or cache is not None
            or position_embeddings is None
            or kwargs.get("output_attentions")
        ):
            return self._plain[0](
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        # Looked up once per step (not again in the recompute), as are the dropout seeds, so the recompute agrees.
        # The seeds (one per projection) are drawn on the device: the kernels read them there, also in a graph.
        found = {name: lora_adapter(module) for name, module in self._projections()}
        dropout = any(f is not None and f[1].dropout > 0 for f in found.values())
        cos, sin = position_embeddings
        # Packed records (finechat.packing): attention within each record, rotary tables at each token's position in
        # its record. The trainer passes no position ids then, so transformers builds no mask.
        segments: Segments | None = kwargs.get("segments")
        if segments is not None:
            attention_mask = None
            cos, sin = segments.rotary(cos, sin)
        graphed = None
        if self.gradient_checkpointing and self._graphs.enabled:  # (the key costs host time: only when it is used)
            graphed = self._graphs.entry(
                self.layer_index,
                hidden_states,
                cos,
                attention_mask,
                len(_ATTN + _MLP),
                self._graph_key(found),
                segments,
            )
        seeds = None
        if dropout and graphed is not None:
            seeds = graphed.seeds.random_(0, dropout_ops.SEED_RANGE)
        elif dropout:
            seeds = dropout_ops.new_seeds(len(_ATTN + _MLP), hidden_states.device)

        kept = None
        if self.gradient_checkpointing and graphed is None and self._keeps(hidden_states, attention_mask):
            kept = self._offloader.kept(self.layer_index, hidden_states.device)

        def run(h: torch.Tensor) -> torch.Tensor:
            return self._layer(h, cos, sin, attention_mask, seeds, found, kept=kept, segments=segments)

        def again(h: torch.Tensor) -> torch.Tensor:  # the recompute: its result only carries gradients
            output = not ENABLED["skip_last_product"]
            # a graphed layer's recompute reads the boundaries its forward graph read (LayerGraphs.forward)
            bounds = graphed.segments if graphed is not None and segments is not None else segments
            return self._layer(
                h, cos, sin, attention_mask, seeds, found, output, kept=kept, restore=True, segments=bounds
            )

        if not self.gradient_checkpointing:
            return run(hidden_states)
        if graphed is None:
            passes = Passes(again=again, kept=kept)
            return checkpoint(run, hidden_states, self._offloader, self.layer_index, passes)
        entry, graphs = graphed, self._graphs

        def layer(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            # packed rows: the graph's own copy of the boundaries (LayerGraphs.forward fills it before each replay)
            return self._layer(h, c, s, None, seeds, found, segments=entry.segments)

        def first(h: torch.Tensor, copied: torch.cuda.Event | None) -> torch.Tensor:
            return graphs.forward(entry, layer, h, cos, sin, copied, segments)

        passes = Passes(first=first, again=again)
        if graphs.backward_enabled:
            params = tuple(p for p in self.parameters() if p.requires_grad)  # what the eager backward would reach

            def recompute(h: torch.Tensor, leaves: list[torch.Tensor]) -> torch.Tensor:
                # In the graph, every tensor it reads must outlive the capture: the forward graph's rotary buffers
                # (refilled at each forward replay), not this step's tables, which are freed after the step.
                # leaves stand in for params (the same memory; see LayerGraphs.backward).
                assert entry.cos is not None and entry.sin is not None
                output = not ENABLED["skip_last_product"]
                leaves_found = _with_leaves(found, params, leaves)
                return self._layer(h, entry.cos, entry.sin, None, seeds, leaves_found, output, segments=entry.segments)

            def backward(h: torch.Tensor, grad: torch.Tensor) -> Any:
                return graphs.backward(entry, recompute, params, h, grad)

            passes = Passes(first=first, again=again, backward=backward, params=params)
        return checkpoint(run, hidden_states, self._offloader, self.layer_index, passes)

    def _keeps(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether this (eager, checkpointed) call keeps its attention half from the first pass instead of
        recomputing it: without an attention mask, and where every layer's kept tensors fit the host's budget
        (rotated q and k, v, the attention's output and the hidden state after it). Not with the checkpoints kept on
        the GPU (offload off): the kept tensors would stay there too, every layer's at once."""
        offloader = self._offloader
        if not (offloader.keeping and offloader.enabled) or mask is not None or not self._widths[0]:
            return False
        tokens = hidden.numel() // hidden.shape[-1]
        per_layer = tokens * (2 * self._widths[0] + self._widths[1] + hidden.shape[-1]) * hidden.element_size()
        return offloader.may_keep(per_layer)

    @staticmethod
    def _graph_key(found: dict[str, Any]) -> tuple:
        """What a layer's graph depends on besides shapes: the adapters' tensors and settings, and the kernel
        switches the bench flips for its ablations."""
        adapters = tuple(
            None if f is None else (f[1].A.data_ptr(), f[1].B.data_ptr(), f[1].dropout, f[1].scale)
            for f in found.values()
        )
        switches = (
            kernels.ENABLED["liger"],
            lora_ops.ENABLED["groups"],
            dropout_ops.ENABLED["fused"],
            nf4.ENABLED["fused"],
        )
        return adapters + switches

    def _projections(self) -> list[tuple[str, nn.Module]]:
        return [(n, getattr(self.self_attn, n)) for n in _ATTN] + [(n, getattr(self.mlp, n)) for n in _MLP]

    def _layer(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        seeds: torch.Tensor | None,
        found: dict[str, Any],
        output: bool = True,
        kept: Kept | None = None,
        restore: bool = False,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        """The layer on h. output=False (the recompute in backward, whose result is never read, only differentiated):
        the down projection skips its weight's decoding and GEMM (lora_linear's output=False), the last GEMM of
        the layer, whose product nothing in the layer reads; every gradient stays the same.

        kept (a checkpointed call that keeps its attention half): the first pass (restore=False) keeps rotary
        embedding and attention as a graph (Kept.record) and the hidden state after attention; the recompute
        (restore=True) then skips the q, k, v and o products (their adapters' parts still run: their backward
        needs them), the rotary embedding and the attention, and takes the kept values instead. Same gradients: the
        kept graph's backward is the one the recompute would have built, on the same values.

        segments (packed records, batch 1): attention within each record (finechat.packing.attention)."""
        attn: Any = self.self_attn
        mlp: Any = self.mlp
        batch, seq, _ = h.shape
        restoring = kept is not None and restore

        def seed(i: int) -> Any:
            return 0 if seeds is None else seeds[i]  # seeds[i]: a view, the kernels read its value on the device

        def product(name: str) -> AdapterProduct | None:
            """With kept: the adapter product kept under name for the recompute, or an empty one for the first pass
            to fill (and keep, after the call)."""
            if kept is None:
                return None
            return AdapterProduct(kept.named(name) if restoring and kept.has(name) else None)

        def keep(name: str, made: AdapterProduct | None) -> None:
            if kept is not None and not restoring and made is not None and made.xa is not None:
                kept.keep(name, made.xa)

        def linear(
            x: torch.Tensor,
            parent: Any,
            name: str,
            offset: int,
            output: bool = True,
            made: AdapterProduct | None = None,
        ) -> torch.Tensor:
            return lora_linear(x, getattr(parent, name), seed(offset), found[name], output, made)

        def linears(
            x: torch.Tensor,
            parent: Any,
            names: tuple[str, ...],
            offset: int,
            output: bool = True,
            apart: bool = False,
            made: AdapterProduct | None = None,
        ) -> list[torch.Tensor]:
            """Projections of the same x in one fused function where they allow it (lora_linears)."""
            layers = [getattr(parent, name) for name in names]
            seeds_ = [seed(offset + i) for i in range(len(names))]
            return lora_linears(x, layers, seeds_, [found[name] for name in names], output, apart, made)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
            if segments is not None:
                return packing.attention(q, k, v, segments, self._scaling, self._kv_groups)
            return _attention(q, k, v, mask, self._scaling, self._kv_groups)

        # Autocast off: every tensor here is already in the model dtype, so this is the arithmetic autocast would pick,
        # and the recompute in backward cannot differ from the first pass.
        with torch.autocast(h.device.type, enabled=False):
            x = rms_norm(h, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
            # Grouped, q, k and v are column slices of one product. Rope makes q and k dense; v is made dense here
            # (a small copy), so that attention sees the layout it always saw.
            # With kept, the adapters' products over x and over o are kept too (a few MiB), so that the recompute
            # skips their passes as well.
            made = product("qkv")
            q, k, v = linears(x, attn, _ATTN[:3], 0, output=not restoring, made=made)
            keep("qkv", made)
            made = product("o")
            if restoring:  # q, k and v are placeholders here (only their gradients count)
                assert kept is not None
                q, k, v = (t.view(batch, seq, -1, self._head_dim).transpose(1, 2) for t in (q, k, v))
                o = kept.replay(q, k, v)
                o_out = linear(o.transpose(1, 2).reshape(batch, seq, -1), attn, "o_proj", 3, False, made)
                h = kept.value("h", h, o_out)
            else:
                q, k, v = (t.view(batch, seq, -1, self._head_dim).transpose(1, 2) for t in (q, k, v.contiguous()))
                o = attend(q, k, v) if kept is None else kept.record(attend, q, k, v)
                h = h + linear(o.transpose(1, 2).reshape(batch, seq, -1), attn, "o_proj", 3, made=made)
                keep("o", made)
                if kept is not None:
                    kept.keep("h", h)
            x = rms_norm(h, self.post_attention_layernorm.weight, self.post_attention_layernorm.variance_epsilon)
            # gate and up share their adapters' pass over x (one mask) but stay two products (apart): Liger's SwiGLU
            # takes one row stride for both and its output, so column slices of one joined product would need copies
            a = swiglu(*linears(x, mlp, _MLP[:2], 4, apart=True))
            return h + linear(a, mlp, "down_proj", 6, output)


def _with_leaves(found: dict[str, Any], params: tuple[torch.Tensor, ...], leaves: list[torch.Tensor]) -> dict[str, Any]:
    """found (projection name -> (base layer, Adapter) or None) with each adapter's A and B replaced by their
    stand-ins in leaves (leaves[i] stands in for params[i])."""
    stand_in = {id(p): leaf for p, leaf in zip(params, leaves, strict=True)}
    return {
        name: None
        if f is None
        else (f[0], replace(f[1], A=stand_in.get(id(f[1].A), f[1].A), B=stand_in.get(id(f[1].B), f[1].B)))
        for name, f in found.items()
    }


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, kv_groups: int
) -> torch.Tensor:
    """Causal SDPA as transformers' sdpa integration calls it: grouped KV heads without copies when there is no mask
    (flash kernel), repeated heads with the mask transformers built otherwise (padding, sliding window)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=kv_groups > 1)
    if kv_groups > 1:
        k = k.repeat_interleave(kv_groups, dim=1)
        v = v.repeat_interleave(kv_groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _base(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    base = _base(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    layers = getattr(backbone, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy without materializing the [tokens, vocab] logits.

    The same computation SFTTrainer runs in `finechat train` (TRL's fused LM head: chunked log-probabilities through
    the head weight), called directly on the backbone's hidden states. segments: the records of a packed row
    (finechat.packing; their first tokens' labels must be -100, as TRL's collator sets them)."""
    from trl.kernels import ChunkedLogProbFunction

    base = _base(model)
    backbone = getattr(base, base.base_model_prefix)
    extra = {} if segments is None else {"segments": segments}
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state
    hidden = hidden[:, :-1]
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    head = base.get_output_embeddings()
    # Every position is scored and ignored ones are masked after: selecting the valid rows would make the host wait
    # for the GPU in the middle of the step.
    log_probs = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        head.bias,
        targets.clamp(min=0),
        1.0,
        32768,
        None,
        1.0,
        ("log_probs",),
    )[0]
    return -(log_probs * valid).sum() / valid.sum().clamp(min=1)
