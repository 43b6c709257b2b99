"""The fast training path: same loss and LoRA gradients as the plain transformers + peft path on the same weights and
batch (CPU in float32 here; CUDA in bf16 with NF4 weights on the GPU machine), unchanged parameter names, the
original layers in eval mode, and the clean fallback of `finechat train` without CUDA."""

import pytest
import torch

from finechat import fastpath, models

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder, fast, quantize="none", dtype="float32", dropout=0.0, checkpointing=True, graphs=True):
    """Base from folder through the model loader, then LoRA with random A and B (seeded: both builds agree)."""
    from peft import LoraConfig, get_peft_model

    model = models.load_base(str(folder), quantize=quantize, compute_dtype=dtype)
    if fast:
        fastpath.prepare(model, gradient_checkpointing=checkpointing, require_cuda=False, cuda_graphs=graphs)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(models.resolve_dtype(dtype))
    model.train()
    return model


def loss_and_grads(model, ids, fast):
    loss = fastpath.causal_lm_loss(model, ids, ids) if fast else model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def grad_error(got, want):
    """Relative error of all LoRA gradients together, and the lowest per-tensor cosine similarity."""
    a = torch.cat([got[n].flatten() for n in want])
    b = torch.cat([want[n].flatten() for n in want])
    cos = min(torch.nn.functional.cosine_similarity(got[n].flatten(), want[n].flatten(), dim=0).item() for n in want)
    return ((a - b).norm() / b.norm()).item(), cos


def batch(vocab, bs=2, seq=48, device="cpu"):
    torch.manual_seed(1)
    return torch.randint(0, vocab, (bs, seq), device=device)


@pytest.mark.parametrize("quantize,checkpointing", [("none", True), ("none", False), ("nf4", True)])
def test_fast_path_matches_plain_loss_and_lora_grads(tiny_mistral_dir, quantize, checkpointing):
    plain = build(tiny_mistral_dir, fast=False, quantize=quantize)
    fast = build(tiny_mistral_dir, fast=True, quantize=quantize, checkpointing=checkpointing)
    ids = batch(plain.config.vocab_size)
    want_loss, want = loss_and_grads(plain, ids, fast=False)
    got_loss, got = loss_and_grads(fast, ids, fast=True)
    assert set(got) == set(want) and len(want) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    err, cos = grad_error(got, want)
    assert abs(got_loss - want_loss) < 1e-5 and err < 1e-4 and cos > 0.9999


def test_q_k_and_v_share_one_lora_function(tiny_mistral_dir, monkeypatch):
    """Each layer's q, k and v go through one call of the LoRA function in forward and recompute, gate and up through
    another (each with its own output), o and down alone."""
    from finechat.kernels import lora_linear as ll

    widths: list[int] = []  # how many layers each call multiplies at once
    apply = ll._LoRALinear.apply
    monkeypatch.setattr(ll._LoRALinear, "apply", lambda *a: widths.append(len(a[1])) or apply(*a))
    model = build(tiny_mistral_dir, fast=True, dropout=0.1)
    loss_and_grads(model, batch(model.config.vocab_size), fast=True)
    layers = model.config.num_hidden_layers
    # forward and recompute, per layer: q/k/v together, gate/up together; o and down alone
    assert sorted(widths) == sorted([3] * 2 * layers + [2] * 2 * layers + [1] * 2 * 2 * layers)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    """A 2-layer random Qwen2 (biased q/k/v projections), no tokenizer: load_base needs none."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_path_matches_plain_on_other_llama_family_models(tiny_model_dir, tiny_qwen2_dir, arch):
    folder = tiny_model_dir if arch == "llama" else tiny_qwen2_dir
    plain, fast = build(folder, fast=False), build(folder, fast=True)
    ids = batch(plain.config.vocab_size)
    want_loss, want = loss_and_grads(plain, ids, fast=False)
    got_loss, got = loss_and_grads(fast, ids, fast=True)
    err, cos = grad_error(got, want)
    assert abs(got_loss - want_loss) < 1e-5 and err < 1e-4 and cos > 0.9999


def test_dropout_masks_agree_between_forward_and_recompute(tiny_mistral_dir):
    kept = build(tiny_mistral_dir, fast=True, dropout=0.2, checkpointing=False)
    recomputed = build(tiny_mistral_dir, fast=True, dropout=0.2, checkpointing=True)
    no_dropout = build(tiny_mistral_dir, fast=True, dropout=0.0)
    ids = batch(kept.config.vocab_size)
    results = []
    for model in (kept, recomputed, no_dropout):
        torch.manual_seed(5)  # the layers draw their dropout seeds from torch's generator
        results.append(loss_and_grads(model, ids, fast=True))
    (l1, g1), (l2, g2), (l3, g3) = results
    assert abs(l1 - l2) < 1e-6 and grad_error(g2, g1)[0] < 1e-5
    assert abs(l1 - l3) > 1e-4  # dropout did act


def test_the_recompute_without_the_last_product_gives_the_same_grads(tiny_mistral_dir, monkeypatch):
    """The recompute skips the down projection's product (nothing reads it): the same loss and gradients, bit for
    bit, as a recompute that computes it."""
    results = []
    for skip in (False, True):
        monkeypatch.setitem(fastpath.ENABLED, "skip_last_product", skip)
        model = build(tiny_mistral_dir, fast=True, dropout=0.1)
        ids = batch(model.config.vocab_size)
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids, True))
    (full_loss, full), (skipped_loss, skipped) = results
    assert skipped_loss == full_loss and all(torch.equal(skipped[n], full[n]) for n in full)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_keeping_the_attention_half_gives_the_recomputes_grads(tiny_mistral_dir, monkeypatch, dropout):
    """The first pass keeps each layer's rotary embedding and attention as a graph (their saved tensors), the hidden
    state after attention and the attention adapters' products; the recompute skips them and the q, k, v and o
    products: the same loss and gradients, bit for bit, as recomputing them. Over the host budget, and with the
    checkpoints kept on the GPU, the layers recompute as before."""
    from finechat.kernels import lora_linear as ll

    passes = []  # the adapters' passes over their inputs (with dropout, one lora_a kernel each)
    lora_a = ll.lora_a
    monkeypatch.setattr(ll, "lora_a", lambda *a: passes.append(1) or lora_a(*a))
    results, counts = [], []
    for keep, budget in ((False, None), (True, None), (True, 0), ("offload off", None)):
        passes.clear()
        model = build(tiny_mistral_dir, fast=True, dropout=dropout)
        fastpath.set_options(model, keep_attention=bool(keep), offload=keep != "offload off")
        layers = fastpath._decoder_layers(model)
        offloader = layers[0]._offloader
        if budget is not None:
            offloader.host_budget = budget
        ids = batch(model.config.vocab_size)
        torch.manual_seed(5)
        results.append(loss_and_grads(model, ids, True))
        assert offloader.kept_calls == (2 if keep is True and budget is None else 0)  # one per layer
        counts.append(len(passes))
    if dropout:  # per layer: q/k/v, o, gate/up and down in forward; the recompute all four, or the last two
        assert counts == [2 * 8, 2 * 6, 2 * 8, 2 * 8]
    (recomputed_loss, recomputed), *others = results
    for loss, grads in others:  # kept; over the budget; with the checkpoints on the GPU (nothing kept)
        assert loss == recomputed_loss and all(torch.equal(grads[n], recomputed[n]) for n in recomputed)


def test_keep_attention_is_a_train_setting(tiny_mistral_dir):
    """TrainConfig.keep_attention (`finechat train --no-keep-attention`) reaches the fast layers' offloader."""
    from finechat import config as cfg

    assert cfg.load_config(None, {}).keep_attention
    assert not cfg.load_config(None, {"keep_attention": False}).keep_attention
    model = models.load_base(str(tiny_mistral_dir))
    offloader = fastpath.prepare(model, require_cuda=False, keep_attention=False).model.layers[0]._offloader
    assert not offloader.keeping
    fastpath.set_options(model, keep_attention=True)
    assert offloader.keeping


def test_prepare_keeps_parameter_names_and_eval_uses_the_original_layers(tiny_mistral_dir):
    plain = models.load_base(str(tiny_mistral_dir))
    fast = fastpath.prepare(models.load_base(str(tiny_mistral_dir)), require_cuda=False)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(isinstance(layer, fastpath.FastDecoderLayer) for layer in fast.model.layers)
    ids = batch(plain.config.vocab_size, bs=1, seq=12)
    fast.eval()
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, plain(ids).logits, atol=1e-6)
        out = fast.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fast_path_is_off_without_cuda(tiny_mistral_dir):
    model = models.load_base(str(tiny_mistral_dir))
    assert not fastpath.supported(model) and "CUDA" in fastpath.unsupported_reason(model)


def test_other_architectures_are_refused_with_the_flag_to_use(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "gpt2" in fastpath.unsupported_reason(model, require_cuda=False)
    with pytest.raises(ValueError, match="--no-fast-path"):
        fastpath.prepare(model, require_cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_train_with_fast_path_on_cpu_is_the_plain_path(tiny_mistral_dir, text_file, tmp_path):
    from finechat import config as cfg
    from finechat.train import train

    losses = []
    for fast in (True, False):
        config = cfg.load_config(
            None,
            dict(
                model=str(tiny_mistral_dir),
                data=str(text_file),
                run_dir=str(tmp_path / f"fast{fast}"),
                max_steps=2,
                batch_size=2,
                max_seq_length=32,
                quantize="none",
                compute_dtype="float32",
                max_eval_docs=2,
                fast_path=fast,
            ),
        )
        losses.append(train(config).train_loss)
    assert losses[0] == losses[1]


# GPU: bf16 activations over NF4 weights, a model with Mistral-7B's head size (128) and grouped KV heads.


def save_mid_mistral(folder, layers: int):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=2048,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mid_mistral_dir(tmp_path_factory):
    return save_mid_mistral(tmp_path_factory.mktemp("mid-mistral"), layers=2)


@pytest.fixture(scope="module")
def deep_mistral_dir(tmp_path_factory):
    """Five layers: more than the graphs' three hidden-state buffers and than the shapes they keep."""
    return save_mid_mistral(tmp_path_factory.mktemp("deep-mistral"), layers=5)


@pytest.mark.gpu
def test_fast_path_matches_plain_within_bf16_rounding_on_gpu(mid_mistral_dir):
    """Both bf16 paths against a float32 run of the plain path on the same NF4 weights: the fast path's error must be
    of the size of the plain path's own bf16 rounding error."""
    ids = batch(2048, bs=2, seq=512, device="cuda")
    ref_loss, ref = loss_and_grads(build(mid_mistral_dir, False, "nf4", "float32"), ids, fast=False)
    plain_loss, plain = loss_and_grads(build(mid_mistral_dir, False, "nf4", "bfloat16"), ids, fast=False)
    fast_loss, fast = loss_and_grads(build(mid_mistral_dir, True, "nf4", "bfloat16"), ids, fast=True)
    plain_err, plain_cos = grad_error(plain, ref)
    fast_err, fast_cos = grad_error(fast, ref)
    direct_err, direct_cos = grad_error(fast, plain)
    print(
        f"loss fp32 {ref_loss:.5f} plain-bf16 {plain_loss:.5f} fast-bf16 {fast_loss:.5f}; LoRA grad rel. error vs "
        f"fp32: plain {plain_err:.4f} (min cos {plain_cos:.5f}), fast {fast_err:.4f} (min cos {fast_cos:.5f}); "
        f"fast vs plain {direct_err:.4f} (min cos {direct_cos:.5f})"
    )
    assert abs(fast_loss - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 2e-3
    assert fast_err <= 1.5 * plain_err + 2e-3 and fast_cos > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpointing_gives_the_same_grads_on_gpu(mid_mistral_dir, dropout):
    """With dropout this also shows that the Triton kernels draw the same masks in the recompute as in forward."""
    ids = batch(2048, bs=2, seq=512, device="cuda")
    results = []
    for checkpointing in (False, True):
        model = build(mid_mistral_dir, True, "nf4", "bfloat16", dropout=dropout, checkpointing=checkpointing)
        torch.manual_seed(5)  # the layers draw their dropout seeds from torch's generator
        results.append(loss_and_grads(model, ids, True))
    (kept_loss, kept), (off_loss, off) = results
    err, cos = grad_error(off, kept)
    assert abs(off_loss - kept_loss) < 1e-4 and err < 1e-2 and cos > 0.999  # flash backward is not bitwise


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dropout,backward,seqs", [(0.0, False, (512,)), (0.1, False, (512,)), (0.1, True, (512,)), (0.1, True, (512, 192))]
)
def test_cuda_graphs_of_the_layer_forwards_give_the_eager_steps_on_gpu(deep_mistral_dir, dropout, backward, seqs):
    """Four steps (eager, captured, replayed twice) with the layer forwards as CUDA graphs (and with backward=True the
    recomputes and backwards too) give the eager path's losses and LoRA gradients, drawing new dropout masks at every
    step as the eager path does. With two lengths the batches take turns, four steps each: the two shapes' graphs
    share one memory pool and one arena of buffers."""
    batches = [batch(2048, bs=2, seq=seq, device="cuda") for seq in seqs]
    runs = []
    for graphs in (False, True):
        model = build(deep_mistral_dir, True, "nf4", "bfloat16", dropout=dropout, graphs=graphs)
        fastpath.set_options(model, cuda_graph_backward=graphs and backward)
        torch.manual_seed(5)  # the layers draw their dropout seeds from torch's CUDA generator
        steps = []
        for step in range(4 * len(seqs)):
            steps.append(loss_and_grads(model, batches[step % len(seqs)], True))
            model.zero_grad(set_to_none=True)
        graphs_of = fastpath.layer_graphs(model)
        runs.append((steps, (graphs_of.captured(), graphs_of.captured_backward(), graphs_of.failed_backward)))
    (eager, eager_graphs), (graphed, graph_count) = runs
    layers = model.config.num_hidden_layers
    shapes = len(seqs)
    assert eager_graphs == (0, 0, "") and graph_count == (shapes * layers, shapes * layers if backward else 0, "")
    for (want_loss, want), (got_loss, got) in zip(eager, graphed, strict=True):
        err, cos = grad_error(got, want)
        assert abs(got_loss - want_loss) < 1e-4 and err < 1e-2 and cos > 0.999, (got_loss, want_loss, err, cos)
    if dropout:
        assert len({loss for loss, _ in eager}) == 4 * shapes  # a new mask at every step


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_attention_half_kept_in_host_memory_gives_the_recomputes_grads_on_gpu(deep_mistral_dir, dropout):
    """At 8,192 tokens (eager layers) the first pass sends each layer's kept attention tensors to pinned host memory
    (the last layer's stay on the GPU) and backward fetches them back: the loss and LoRA gradients of recomputing
    the attention, in no more GPU memory than a few layers' kept tensors more."""
    ids = batch(2048, bs=4, seq=2048, device="cuda")
    results, peaks, pinned = [], [], []
    for keep in (False, True):
        model = build(deep_mistral_dir, True, "nf4", "bfloat16", dropout=dropout)
        fastpath.set_options(model, keep_attention=keep)
        torch.manual_seed(5)
        loss_and_grads(model, ids, True)  # the first step allocates the host buffers
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(6)
        results.append(loss_and_grads(model, ids, True))
        peaks.append(torch.cuda.max_memory_allocated())
        pinned.append(len(fastpath._decoder_layers(model)[0]._offloader._kept_buffers))
        del model
    (recomputed_loss, recomputed), (kept_loss, kept) = results
    layers, per_layer = 5, 8192 * (2 * 1024 + 2 * 256 + 1024) * 2
    err, cos = grad_error(kept, recomputed)
    assert abs(kept_loss - recomputed_loss) < 1e-4 and err < 1e-2 and cos > 0.999, (kept_loss, recomputed_loss, err)
    assert pinned[0] == 0 and pinned[1] >= 3 * (layers - 1), pinned
    assert peaks[1] <= peaks[0] + 3 * per_layer, [p / 2**20 for p in peaks]


@pytest.mark.gpu
def test_fast_path_is_on_with_cuda(mid_mistral_dir):
    assert fastpath.supported(models.load_base(str(mid_mistral_dir), quantize="nf4", compute_dtype="bfloat16"))


# conftest.tiny_config's overrides for the GPU runs of `finechat train`: NF4 in bf16 (the defaults), dropout 0
# (so that the runs compared give the same loss), as the config file ships them otherwise
GPU_RUN = dict(
    quantize="nf4", compute_dtype="bfloat16", lora_dropout=0.0, max_eval_docs=2, eval_fraction=0.02, save_steps=50
)


@pytest.mark.gpu
def test_finechat_train_takes_the_fast_path_on_gpu(tiny_mistral_dir, text_file, tmp_path, caplog):
    """`finechat train` through SFTTrainer: the fast path is taken and reaches the plain path's loss (dropout 0)."""
    from conftest import tiny_config
    from finechat.train import train

    losses = {}
    for fast in (True, False):
        config = tiny_config(
            tiny_mistral_dir, text_file, tmp_path / f"fast{fast}", max_steps=3, fast_path=fast, **GPU_RUN
        )
        with caplog.at_level("INFO", logger="finechat.fastpath"):
            losses[fast] = train(config).train_loss
        assert ("fast training path" in caplog.text) == fast
        caplog.clear()
    assert abs(losses[True] - losses[False]) < 2e-2 * abs(losses[False])


def test_a_right_padded_row_trains_as_its_real_tokens_with_or_without_its_mask(tiny_mistral_dir):
    """What finechat's Trainer relies on with causal_attention: through the fast path's layers, a right-padded row
    (pads labelled -100) gives the loss and LoRA gradients of its real tokens alone, with its padding mask and
    without it (causal attention never shows a real token a pad)."""
    model = build(tiny_mistral_dir, fast=True, dropout=0.0)
    ids, real = batch(model.config.vocab_size, bs=1, seq=48), 30
    padded = torch.cat([ids[:, :real], torch.zeros(1, 48 - real, dtype=ids.dtype)], dim=1)
    mask = (torch.arange(48) < real).long()[None]
    labels = padded.masked_fill(mask == 0, -100)

    def run(**inputs):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    alone_loss, alone = run(input_ids=padded[:, :real], labels=labels[:, :real])
    for inputs in (dict(attention_mask=mask), {}):
        loss, grads = run(input_ids=padded, labels=labels, **inputs)
        assert loss == pytest.approx(alone_loss, rel=1e-6)
        assert grad_error(grads, alone)[0] < 1e-5


def test_padding_is_causal_unless_a_shorter_sliding_window_applies():
    from types import SimpleNamespace as Config

    def model(**config):
        return Config(config=Config(**config))

    assert fastpath.padding_is_causal(model(), 4096)  # Llama: no window
    assert fastpath.padding_is_causal(model(sliding_window=None), 4096)  # Mistral-7B-Instruct-v0.2
    assert not fastpath.padding_is_causal(model(sliding_window=1024), 4096)
    assert fastpath.padding_is_causal(model(sliding_window=4096), 4096)  # no row is longer than the window
    assert fastpath.padding_is_causal(model(sliding_window=1024, use_sliding_window=False), 4096)  # Qwen2's default


@pytest.mark.gpu
def test_right_padded_batches_graph_and_train_as_their_real_tokens_on_gpu(deep_mistral_dir):
    """On the GPU (NF4, bf16, dropout 0): right-padded rows without their mask, as finechat's Trainer sends them,
    are captured as CUDA graphs (forwards and backwards), and their loss and LoRA gradients agree with the masked
    batch's (kept out of the graphs by its mask) within bf16 rounding, step after step."""
    model = build(deep_mistral_dir, True, "nf4", "bfloat16", dropout=0.0)
    ids = batch(2048, bs=2, seq=512, device="cuda")
    mask = (torch.arange(512, device="cuda")[None, :] < torch.tensor([[512], [384]], device="cuda")).long()
    labels = ids.masked_fill(mask == 0, -100)

    def run(attention_mask):
        steps = []
        for _ in range(3):  # eager, captured, replayed
            loss = fastpath.causal_lm_loss(model, ids, labels, attention_mask)
            loss.backward()
            steps.append(
                (loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
            )
            model.zero_grad(set_to_none=True)
        return steps

    masked = run(mask)
    graphs = fastpath.layer_graphs(model)
    assert graphs.captured() == 0
    unmasked = run(None)
    assert graphs.captured() == 5 and graphs.captured_backward() == 5
    for (loss_m, grads_m), (loss_u, grads_u) in zip(masked, unmasked, strict=True):
        assert loss_u == pytest.approx(loss_m, rel=2e-3)
        err, cos = grad_error(grads_u, grads_m)
        assert err < 0.05 and cos > 0.99


@pytest.mark.gpu
def test_finechat_train_graphs_chat_batches_of_many_lengths_on_gpu(tiny_mistral_dir, tmp_path, captured_shapes):
    """`finechat train` on chat records of many lengths: the batches come padded to several shapes (multiples of 64
    tokens), train without their padding mask, and are graphed, several shapes at once; the run gives the loss of
    the same run without graphs."""
    from conftest import tiny_config, write_chats
    from finechat.train import train

    chats = write_chats(tmp_path / "chats.jsonl", 60)
    captured = captured_shapes
    losses = {}
    for graphs in (True, False):
        run = tmp_path / f"graphs{graphs}"
        config = tiny_config(
            tiny_mistral_dir, chats, run, max_steps=12, max_seq_length=256, cuda_graphs=graphs, **GPU_RUN
        )
        losses[graphs] = train(config).train_loss
        if graphs:
            shapes = {shape[0] for shape in captured}
            assert len(shapes) >= 2 and all(s[1] % 64 == 0 for s in shapes), shapes
    assert abs(losses[True] - losses[False]) < 1e-2 * abs(losses[False]), losses
