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
