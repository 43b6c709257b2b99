"""Packed chat records (finechat.packing): the padding tail as one record, the records' rotary positions, the fast
path's attention within each record against transformers' own block-diagonal mask (CPU in float32; CUDA in bf16
with NF4 weights, graphed and with the kept attention), and `finechat train --packing`."""

import pytest
import torch

from finechat import fastpath, packing
from test_fastpath import GPU_RUN, build, grad_error

RECORDS = (13, 20, 9)  # a packed row's records; the row is padded to 48 tokens


def packed_row(lengths, total, vocab, device="cpu", seed=1):
    """A flattened row as TRL's padding-free collator and PackedBatches make it: ids, labels (-100 on each record's
    first token and on the padding), position ids (the padding counts up as one more record) and Segments."""
    torch.manual_seed(seed)
    ids = torch.randint(1, vocab, (1, total))
    positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(total - sum(lengths))])[None]
    labels = ids.masked_fill(positions == 0, -100)
    labels[:, sum(lengths) :] = -100
    ends = torch.tensor([0, *lengths, total - sum(lengths)]).cumsum(0)
    cu = (ends if total > sum(lengths) else ends[:-1]).to(torch.int32)
    segments = packing.Segments(cu=cu.to(device), longest=int(cu.diff().max()), positions=positions.to(device))
    return ids.to(device), labels.to(device), positions.to(device), segments


def step(model, fast, ids, labels, positions, segments):
    """Loss and LoRA gradients of one row: the fast path with segments, or the plain path with position ids (from
    which transformers builds its block-diagonal causal mask when there is no cache, as in training)."""
    if fast:
        loss = fastpath.causal_lm_loss(model, ids, labels, segments=segments)
    else:
        loss = model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_the_padding_at_a_rows_end_becomes_one_record():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = packing.PackedBatches(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16)
    )
    examples = [
        {"input_ids": list(range(1, 8)), "seq_lengths": [4, 3]},
        {"input_ids": list(range(1, 6)), "seq_lengths": [5]},
    ]
    batch = collate(examples)
    assert batch["input_ids"].shape == (1, 16)  # 12 tokens, padded to 16
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 12, 16]  # TRL's own: a record per pad token
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["max_length_q"] == 5 and batch["seq_idx"][0].tolist() == [0] * 4 + [1] * 3 + [2] * 5 + [3] * 4
    assert (batch["labels"][0, 12:] == -100).all() and batch["labels"][0, [0, 4, 7]].tolist() == [-100] * 3
    assert collate.pad_token_id == 0  # the wrapped collator's settings show through


def test_segments_bucket_and_rotary_tables():
    cu = torch.tensor([0, 100, 130, 300], dtype=torch.int32)
    assert packing.Segments(cu=cu, longest=170).bucket() == (16, 256)
    assert packing.Segments(cu=torch.arange(0, 40, dtype=torch.int32), longest=1).bucket() == (64, 128)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    table = torch.arange(6.0)[None, :, None].expand(1, 6, 4)
    segments = packing.Segments(cu=cu, longest=3, positions=positions)
    cos, sin = segments.rotary(table, -table)
    assert cos[0, :, 0].tolist() == [0, 1, 2, 0, 1, 0] and sin[0, :, 0].tolist() == [0, -1, -2, 0, -1, 0]
    assert segments.rotary(table, -table)[0] is cos  # once per row: every layer gets the same tables


@pytest.mark.parametrize("checkpointing,keep", [(True, True), (True, False), (False, False)])
def test_a_packed_row_trains_as_transformers_masked_row(tiny_mistral_dir, checkpointing, keep):
    """The fast path with Segments (per-record rotary positions, attention within each record; the kept attention
    when keep) gives the loss and LoRA gradients of the plain path given the position ids, which transformers
    turns into a block-diagonal causal mask."""
    plain = build(tiny_mistral_dir, fast=False)
    fast = build(tiny_mistral_dir, fast=True, checkpointing=checkpointing)
    fastpath.set_options(fast, keep_attention=keep)
    row = packed_row(RECORDS, 48, plain.config.vocab_size)
    want_loss, want = step(plain, False, *row)
    got_loss, got = step(fast, True, *row)
    err, cos = grad_error(got, want)
    assert abs(got_loss - want_loss) < 1e-5 and err < 1e-4 and cos > 0.9999
    kept = fastpath.offloader(fast).kept_calls
    assert kept == (2 if keep else 0)  # one per layer
    # and a record's loss does not depend on its neighbours: the same first record, other records after it
    other = packed_row((13, 30), 48, plain.config.vocab_size, seed=2)
    other[0][:, :13] = row[0][:, :13]
    per_token = []
    for ids, _, _, segments in (row, other):
        logits = fast(input_ids=ids, segments=segments).logits
        per_token.append(torch.nn.functional.cross_entropy(logits[0, :12], ids[0, 1:13], reduction="none"))
    assert torch.allclose(per_token[0], per_token[1], atol=1e-5)
    assert not torch.equal(other[0][:, 13:], row[0][:, 13:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run (the GPU one is below)")
def test_finechat_train_packing_on_cpu(tiny_model_dir, tmp_path):
    """`finechat train --packing` on chat records: fewer steps for the same epoch (several records a row), a
    finite loss, the setting saved with the run."""
    from conftest import tiny_config, write_chats
    from finechat.config import load_config
    from finechat.train import train

    chats = write_chats(tmp_path / "chats.jsonl", 40)
    steps = {}
    for packed in (False, True):
        run = tmp_path / f"packed{packed}"
        config = tiny_config(tiny_model_dir, chats, run, max_steps=-1, max_seq_length=256, packing=packed)
        result = train(config)
        steps[packed] = result.step
        assert result.train_loss is not None and result.train_loss == result.train_loss  # not NaN
    assert steps[True] <= 0.75 * steps[False], steps
    assert load_config(tmp_path / "packedTrue" / "config.yaml").packing is True


@pytest.mark.gpu
def test_packed_rows_graph_and_train_as_their_records_on_gpu(tmp_path):
    """On the GPU (NF4, bf16): packed rows through flash attention's variable-length kernel against the plain path
    in float32 (transformers' block-diagonal mask): an error of the size of the plain path's own bf16 rounding.
    Graphed: the steps' layer graphs are captured at the row's bucket and replayed over other records (the graph
    reads the new boundaries), with the eager steps' losses and gradients. Past the graphs' 4,096 tokens: the kept
    attention gives the recompute's gradients."""
    from test_fastpath import save_mid_mistral

    folder = save_mid_mistral(tmp_path / "mistral", layers=3)
    rows = [
        packed_row((300, 212, 180, 250, 70), 1024, 2048, "cuda", 0),
        packed_row((100, 500, 64, 300), 1024, 2048, "cuda", 7),  # the same bucket, other records
    ]
    ref_loss, ref = step(build(folder, False, "nf4", "float32"), False, *rows[0])
    plain_loss, plain = step(build(folder, False, "nf4", "bfloat16"), False, *rows[0])
    runs = {}
    for graphs in (False, True):
        model = build(folder, True, "nf4", "bfloat16", dropout=0.0, graphs=graphs)
        runs[graphs] = [step(model, True, *rows[i]) for i in (0, 0, 0, 1, 0)]
        counts = (fastpath.layer_graphs(model).captured(), fastpath.layer_graphs(model).captured_backward())
        assert counts == ((3, 3) if graphs else (0, 0)), counts
    fast_loss, fast = runs[False][0]
    plain_err, _ = grad_error(plain, ref)
    fast_err, fast_cos = grad_error(fast, ref)
    print(
        f"packed: loss fp32 {ref_loss:.5f} plain-bf16 {plain_loss:.5f} fast-bf16 {fast_loss:.5f}; grad error "
        f"plain {plain_err:.4f} fast {fast_err:.4f}"
    )
    assert abs(fast_loss - ref_loss) <= 2 * abs(plain_loss - ref_loss) + 2e-3
    assert fast_err <= 1.5 * plain_err + 2e-3 and fast_cos > 0.99
    for (want_loss, want), (got_loss, got) in zip(runs[False], runs[True], strict=True):
        err, cos = grad_error(got, want)
        assert abs(got_loss - want_loss) < 1e-3 and err < 1e-2 and cos > 0.999, (got_loss, want_loss, err, cos)
    assert runs[True][3][0] != runs[True][0][0]  # the other records' loss, not a replay of the first row's
    long_row = packed_row((3000, 1500, 600), 5120, 2048, "cuda", 3)
    kept = {}
    for keep in (False, True):
        model = build(folder, True, "nf4", "bfloat16", dropout=0.0)
        fastpath.set_options(model, keep_attention=keep)
        kept[keep] = step(model, True, *long_row)
        assert fastpath.offloader(model).kept_calls == (3 if keep else 0)
    err, cos = grad_error(kept[True][1], kept[False][1])
    assert abs(kept[True][0] - kept[False][0]) < 1e-3 and err < 1e-2 and cos > 0.999


@pytest.mark.gpu
def test_finechat_train_packing_graphs_its_rows_on_gpu(tiny_mistral_dir, tmp_path, captured_shapes):
    """`finechat train --packing` on chat records on the GPU: the flattened rows are graphed at their bucket, and
    the run gives the loss of the same run without graphs."""
    from conftest import tiny_config, write_chats
    from finechat.train import train

    chats = write_chats(tmp_path / "chats.jsonl", 80)
    captured = captured_shapes
    losses = {}
    for graphs in (True, False):
        run = tmp_path / f"graphs{graphs}"
        config = tiny_config(
            tiny_mistral_dir, chats, run, max_steps=6, max_seq_length=256, packing=True, cuda_graphs=graphs, **GPU_RUN
        )
        losses[graphs] = train(config).train_loss
        if graphs:
            assert captured and all(s[0][0] == 1 and s[0][1] % 256 == 0 and s[-1] is not None for s in captured)
    assert abs(losses[True] - losses[False]) < 1e-2 * abs(losses[False]), losses
