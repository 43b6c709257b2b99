"""`finechat merge --gguf`: a merged model as one GGUF file, for llama.cpp, Ollama, LM Studio and other GGUF runtimes.

Written with gguf-py (the llama.cpp project's own Python package, on PyPI as `gguf`) from the merged model's weights:
the architecture's hyperparameters, every tensor under its GGUF name, and the tokenizer. Llama and Mistral are
written as GGUF's "llama" architecture, whose q and k weights hold each head's rotary pairs interleaved where
transformers keeps them in two halves (the rows are reordered here, as llama.cpp's converter does); Qwen2 as "qwen2"
(its q, k and v biases too, no reordering).

The tokenizer comes from the base's own GGUF file where the base was one (the `smollm2` default: its vocabulary,
merges, token types and special ids, copied as they are), else from the run's `tokenizer.json` (_tokenizer_kind):
a byte-level BPE that splits text as GPT-2 does ("gpt2" in GGUF, pre-tokenizer "gpt-2"), or a SentencePiece-style
BPE in the form of Mistral's and Llama 2's tokenizer.json ("llama" in GGUF, with scores, byte tokens and the space
prefix). The chat template is always the run's, the one training used. Other tokenizers are refused with the way
out, llama.cpp's convert_hf_to_gguf.py on the merged folder: they would tokenize differently in a GGUF runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from finechat.errors import UserError

# --gguf-type: what the matrices are stored as (vectors, the norms, stay float32 as llama.cpp's converter keeps them)
TYPES = ("f16", "bf16", "q8_0", "f32")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_LAYER = {  # transformers' names inside model.layers.N -> GGUF's inside blk.N
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def check(model_type: str | None, gguf_type: str) -> None:
    """Raise UserError before any work when the export cannot be made (model_type None: before the model is loaded,
    the type setting only)."""
    if gguf_type not in TYPES:
        raise UserError(f"--gguf-type {gguf_type}: use one of {', '.join(TYPES)}")
    if model_type is not None and model_type not in ARCHS:
        raise UserError(
            f"--gguf: model type {model_type!r} is not written here (llama, mistral, qwen2); convert the merged "
            "folder with llama.cpp's convert_hf_to_gguf.py"
        )


def file_name(folder_name: str, gguf_type: str) -> str:
    """The GGUF file's name inside the merged folder."""
    return f"{folder_name}-{gguf_type}.gguf"


def write(model: Any, tokenizer: Any, path: Path, gguf_type: str, source_gguf: Path | None, name: str) -> Path:
    """Write model (a merged transformers causal LM) and tokenizer to path as GGUF; returns path. source_gguf: the
    base's own GGUF file, whose tokenizer is copied (None: the tokenizer is built from tokenizer.json)."""
    import gguf

    config = model.config
    check(config.model_type, gguf_type)
    arch = ARCHS[config.model_type]
    tokenizer_fields = _source_tokenizer(source_gguf) if source_gguf else _json_tokenizer(tokenizer)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(gguf, gguf_type))
    for key, (value, vtype, sub_type) in tokenizer_fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        gguf_name = _gguf_name(hf_name)
        if gguf_name is None or (tied and gguf_name == "output.weight"):
            continue
        data = tensor.detach().float().cpu().numpy()
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _interleave_rotary(data, heads if "attn_q" in gguf_name else kv_heads)
        data, raw = _stored(gguf, data, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _gguf_name(hf_name: str) -> str | None:
    """GGUF's name of a transformers weight (None: not written, e.g. a rotary buffer)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return None
    inner, kind = ".".join(parts[3:-1]), parts[-1]
    return f"blk.{parts[2]}.{_LAYER[inner]}.{kind}" if inner in _LAYER else None


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """q or k rows from transformers' rotary layout (each head's first half, then its second) to GGUF llama's
    (the two halves' rows alternating), head by head."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _stored(gguf: Any, data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGUF type: vectors float32, matrices as gguf_type."""
    if data.ndim < 2 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "f16":
        return data.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype


def _file_type(gguf: Any, gguf_type: str) -> int:
    kinds = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf.LlamaFileType, kinds[gguf_type]))


def _source_tokenizer(source: Path) -> dict[str, tuple[Any, Any, Any]]:
    """The tokenizer.* fields of a GGUF file (the chat template aside), as (value, type, element type)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields: dict[str, tuple[Any, Any, Any]] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields[key] = (field.contents(), vtype, sub_type)
    return fields


def _json_tokenizer(tokenizer: Any) -> dict[str, tuple[Any, Any, Any]]:
    """GGUF's tokenizer fields from a tokenizer.json BPE: the vocabulary by id, the merges, the token types and the
    special ids, as GGUF's "gpt2" tokenizer (byte-level) or "llama" tokenizer (SentencePiece-style: byte fallback,
    words marked with a leading "▁"; each token also gets a score, the runtimes' merge priority: minus its id, as in
    SentencePiece's BPE, where a piece's id is its merge rank)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    kind = _tokenizer_kind(spec, model, type(tokenizer).__name__)
    if kind not in ("gpt2", "llama"):
        raise UserError(
            f"--gguf: the tokenizer ({kind}) is not written here, only byte-level BPE with GPT-2's pre-tokenization, "
            "SentencePiece-style BPE or a GGUF base's own; convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    scores = [0.0] * size
    for content, i in vocab.items():
        tokens[i] = content
        types[i] = int(_token_type(gguf, content, added.get(content), model, kind))
        if types[i] == gguf.TokenType.NORMAL:
            scores[i] = -float(i)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    string, array, uint32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
    fields: dict[str, tuple[Any, Any, Any]] = {
        "tokenizer.ggml.model": (kind, string, None),
        "tokenizer.ggml.tokens": (tokens, array, string),
        "tokenizer.ggml.token_type": (types, array, gguf.GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, array, string),
    }
    if kind == "gpt2":
        # llama.cpp's name of GPT-2's split of the text (_tokenizer_kind checked that the tokenizer splits so)
        fields["tokenizer.ggml.pre"] = ("gpt-2", string, None)
    else:
        fields["tokenizer.ggml.pre"] = ("default", string, None)
        fields["tokenizer.ggml.scores"] = (scores, array, gguf.GGUFValueType.FLOAT32)
        fields["tokenizer.ggml.add_space_prefix"] = (True, gguf.GGUFValueType.BOOL, None)  # (the Prepend normalizer)
        # as the run's tokenizer does it (its add_bos_token attribute need not say: transformers 5 leaves it False)
        bos = getattr(tokenizer, "bos_token_id", None)
        add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        fields["tokenizer.ggml.add_bos_token"] = (add_bos, gguf.GGUFValueType.BOOL, None)
    specials = (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
        ("unknown", "unk_token_id"),
    )
    for key, attribute in specials:
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(value), uint32, None)
    return fields


def _token_type(gguf: Any, content: str, added: dict[str, Any] | None, model: dict[str, Any], kind: str) -> Any:
    """A token's GGUF type: control (added special), user-defined (added), unknown, byte (<0xNN> pieces of a
    SentencePiece-style vocabulary) or normal."""
    if added is not None:
        return gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if content == model.get("unk_token"):
        return gguf.TokenType.UNKNOWN
    if kind == "llama" and len(content) == 6 and content.startswith("<0x") and content.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _tokenizer_kind(spec: dict[str, Any], model: dict[str, Any], name: str) -> str:
    """What a tokenizer.json is for GGUF: "gpt2" for a byte-level BPE whose text is split as GPT-2 splits it,
    "llama" for a SentencePiece-style BPE in the form of Mistral's and Llama 2's tokenizer.json (byte fallback, and
    "▁" before each piece of text between special tokens: a Prepend and Replace normalizer as in their files, or the
    Metaspace pre-tokenizer with prepend_scheme "always" that transformers 5 saves them with), else a description of
    the tokenizer (not written). GGUF runtimes tokenize as those forms do. Others differ there: a byte-level BPE with
    a split regex of its own (Qwen2's, Llama 3's), which GGUF names per model; a Metaspace pre-tokenizer that
    prepends "▁" at the text's start only (prepend_scheme "first"), where llama.cpp prepends it after a special
    token too (measured on "<s>[INST]")."""
    if model.get("type") != "BPE":
        return str(model.get("type", name))
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [str(s.get("type")) for s in steps if s]
    if model.get("byte_fallback"):
        normalizer = spec.get("normalizer") or {}
        norms = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
        legacy = not types and [n.get("type") for n in norms] == ["Prepend", "Replace"]
        # transformers 5 saves Mistral's and Llama 2's tokenizer so: the same "▁" before each piece of text
        always = types == ["Metaspace"] and steps[0].get("prepend_scheme") == "always" and not steps[0].get("split")
        if legacy or (always and not normalizer):
            return "llama"
        scheme = f" (prepend_scheme {steps[0].get('prepend_scheme')})" if types == ["Metaspace"] else ""
        return "SentencePiece-style BPE split by " + (", ".join(types) or "its normalizer") + scheme
    if types != ["ByteLevel"] or not steps[0].get("use_regex", True):
        return "BPE with its own pre-tokenization: " + ", ".join(types)
    return "gpt2"


def source_gguf(base_spec: str) -> Path | None:
    """The base's own GGUF file, when the run's base was one (the smollm2 alias or a .gguf path)."""
    from finechat import models

    if base_spec == models.SMOLLM2_ALIAS:
        return models.smollm2_gguf()
    path = Path(base_spec).expanduser()
    return path if base_spec.endswith(".gguf") and path.is_file() else None
