"""finechat.offload on CPU: the checkpoint's forward and recompute, and the copy it keeps of an input whose buffer is
written again (the GPU path, with pinned host copies, is in tests/test_fastpath.py's GPU tests)."""

import torch

from finechat.offload import Offloader, Passes, checkpoint


def test_checkpoint_recomputes_in_backward_what_its_first_pass_computed():
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    calls = {"run": 0, "first": 0, "again": 0}

    def run(h):
        calls["run"] += 1
        return torch.tanh(h @ weight)

    def first(h, copied):  # e.g. a CUDA graph's replay: the same function, without autograd
        calls["first"] += 1
        assert copied is None and not torch.is_grad_enabled()
        return torch.tanh(h @ weight)

    def again(h):  # the recompute: the same gradients, its values unread
        calls["again"] += 1
        return torch.tanh(h @ weight)

    out = checkpoint(run, x, Offloader(), 0, Passes(first=first))
    assert calls == {"run": 0, "first": 1, "again": 0} and out.requires_grad
    out.sum().backward()
    assert calls == {"run": 1, "first": 1, "again": 0}  # backward recomputed through run
    want_x, want_w = torch.autograd.grad(torch.tanh(x @ weight).sum(), [x, weight])
    assert torch.allclose(x.grad, want_x) and torch.allclose(weight.grad, want_w)
    x.grad = weight.grad = None
    checkpoint(run, x, Offloader(), 0, Passes(again=again)).sum().backward()
    assert calls == {"run": 2, "first": 1, "again": 1}  # run in forward, again in backward
    assert torch.allclose(x.grad, want_x) and torch.allclose(weight.grad, want_w)


def test_an_input_whose_buffer_is_reused_is_kept_as_a_copy():
    buffer = torch.randn(4, 8)
    saved = Offloader().save(0, buffer, reused=True)
    kept = saved.kept.clone()
    buffer.zero_()  # the next replay writes the buffer again
    assert torch.equal(saved.kept, kept) and saved.kept.data_ptr() != buffer.data_ptr()
    assert Offloader().save(0, buffer).kept is buffer  # not reused: kept as it is


def zero_valued(t):
    """Zeros with t's gradient path (as lora_linear's output=False gives)."""
    return t - t.detach()


def test_a_kept_part_is_not_recomputed_and_gives_the_recomputes_gradients():
    """A checkpointed function whose middle part (here sin(a * b)) the first pass keeps as a graph: the recompute
    runs the parts around it only, takes the kept output and value, and every gradient is the plain function's."""
    w1 = torch.randn(8, 8, requires_grad=True)
    w2 = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    calls = {"middle": 0}

    def middle(a, b):
        calls["middle"] += 1
        return torch.sin(a * b)

    def plain(h):
        a, b = h @ w1, h @ w2
        m = h + middle(a, b)
        return torch.tanh(m @ w2)

    want = torch.autograd.grad(plain(x).sum(), [x, w1, w2])
    calls["middle"] = 0
    offloader = Offloader()
    kept = offloader.kept(0, x.device)

    def first(h):
        a, b = h @ w1, h @ w2
        m = h + kept.record(middle, a, b)
        kept.keep("m", m)
        return torch.tanh(m @ w2)

    def again(h):  # a and b's values are not read: zeros stand in for them, with their gradients' paths
        a, b = (zero_valued(h @ w) for w in (w1, w2))
        m = kept.value("m", h, kept.replay(a, b))
        return torch.tanh(m @ w2)

    out = checkpoint(first, x, offloader, 0, Passes(again=again, kept=kept))
    assert calls["middle"] == 1
    out.sum().backward()
    assert calls["middle"] == 1  # the backward ran the kept graph, not middle again
    for got, expected in zip((x.grad, w1.grad, w2.grad), want, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
    assert kept._items == [] and kept._edges is None  # released after the layer's backward


def test_kept_tensors_count_against_the_host_budget(monkeypatch, caplog):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = Offloader().host_budget
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes of one machine share it
    assert Offloader().host_budget == alone // 4
    offloader = Offloader()
    offloader.layers, offloader.host_budget = 32, 16 << 30
    with caplog.at_level("INFO", logger="finechat.offload"):
        assert offloader.may_keep(512 << 20) and not offloader.may_keep(768 << 20)
        offloader.may_keep(512 << 20)  # said once per size
    assert [r.getMessage() for r in caplog.records] == [
        "keeping each layer's attention in host memory: 16.0 GiB (budget 16.0 GiB)",
        "recomputing the attention: keeping it would take 24.0 GiB, over 16.0 GiB",
    ]


def test_host_buffers_keep_the_layout_and_are_reused_for_smaller_batches(monkeypatch):
    """The pinned buffer behind a kept tensor has its strides (a permuted q stays permuted, so backward gets the
    layout attention saved) and serves every smaller batch after it without pinning memory again. (Pinning needs
    CUDA: here torch.empty's pin_memory is dropped and the allocations counted.)"""
    made = []
    empty = torch.empty

    def pinned_empty(*args, pin_memory=False, **kw):
        made.append(pin_memory)
        return empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", pinned_empty)
    offloader, store = Offloader(), {}
    q = torch.randn(2, 16, 4, 8).transpose(1, 2)  # [batch, heads, seq, dim] over a [batch, seq, heads, dim] layout
    buf = offloader._buffer((0, 0), q, store)
    assert buf.shape == q.shape and buf.stride() == q.stride() and made == [True]
    smaller = torch.randn(1, 12, 4, 8).transpose(1, 2)
    again = offloader._buffer((0, 0), smaller, store)
    assert again.stride() == smaller.stride() and again.data_ptr() == buf.data_ptr() and made == [True]
    again.copy_(smaller)
    assert torch.equal(again, smaller)
    offloader._buffer((0, 0), torch.randn(4, 16, 4, 8), store)  # larger: pinned anew
    assert made == [True, True]
