"""finechat.optim.PagedAdamW32bit against bitsandbytes' PagedAdamW32bit: the same parameters and states, bitwise,
after several steps (CPU here; CUDA with paged states on the GPU machine), and a checkpoint round trip that keeps the
float32 states of bf16 parameters."""

import warnings

import pytest
import torch

from finechat.optim import PAGED_FROM, PagedAdamW32bit, trainer_optimizer


def params(device="cpu", dtype=torch.bfloat16, big=False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 96), (96, 16), (40,)] + ([(16, PAGED_FROM // 16 + 3)] if big else [])
    return [torch.nn.Parameter(torch.randn(*s, generator=gen).to(device, dtype)) for s in shapes]


def run(make_opt, ps, steps=3, start=0):
    """steps updates with gradients that depend on the step number only (so two runs see the same ones)."""
    opt = make_opt(ps)
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def groups(ps):
    return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]


def bnb_paged(ps):
    import bitsandbytes as bnb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        return bnb.optim.PagedAdamW32bit(groups(ps), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)


def ours(ps):
    return PagedAdamW32bit(groups(ps), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)


def check_same_as_bitsandbytes(device, dtype, big=False):
    want, got = params(device, dtype, big), params(device, dtype, big)
    ref, opt = run(bnb_paged, want), run(ours, got)
    if device == "cuda":
        torch.cuda.synchronize()  # paged states are read by the host below
    assert not torch.equal(got[0], params(device, dtype, big)[0])  # the steps moved the parameters
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
        for key in ("state1", "state2"):
            s, r = opt.state[a][key], ref.state[b][key]
            assert s.dtype == torch.float32 and torch.equal(s.to(r.device), r)
        assert opt.state[a]["step"] == ref.state[b]["step"] == 3
    return opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_parameters_and_states_as_bitsandbytes_on_cpu(dtype):
    check_same_as_bitsandbytes("cpu", dtype)


def test_one_update_kernel_per_group_and_a_missing_gradient_handled_like_bitsandbytes(monkeypatch):
    """Each group's parameters go through bitsandbytes' kernel in one call; a step where one parameter has no
    gradient updates the others as bitsandbytes does (one at a time, the gradient-less one untouched)."""
    import bitsandbytes.functional as bnbf

    calls = []
    update = bnbf.optimizer_update_32bit

    def counted(*args, **kw):
        calls.append(args[1].numel())
        return update(*args, **kw)

    want, got = params(), params()
    ref, opt = run(bnb_paged, want, steps=2), run(ours, got, steps=2)
    monkeypatch.setattr(bnbf, "optimizer_update_32bit", counted)
    run(lambda _: opt, got, steps=1, start=2)
    assert calls == [16 * 96 + 96 * 16, 40]  # group 0's two tensors together, then group 1's one
    calls.clear()
    monkeypatch.setattr(bnbf, "optimizer_update_32bit", update)
    run(lambda _: ref, want, steps=1, start=2)
    for ps, o in ((want, ref), (got, opt)):
        gen = torch.Generator().manual_seed(7)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        ps[1].grad = None
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert [opt.state[p]["step"] for p in got] == [ref.state[p]["step"] for p in want] == [4, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert all(torch.equal(opt.state[a][k], ref.state[b][k]) for k in ("state1", "state2"))


def test_parameters_move_and_weight_decay_follows_the_groups():
    ps = params(dtype=torch.float32)
    before = [p.detach().clone() for p in ps]
    opt = PagedAdamW32bit([{"params": ps[:1], "weight_decay": 0.5}, {"params": ps[1:]}], lr=1e-2)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves a parameter
    assert torch.allclose(ps[0], before[0] * (1 - 1e-2 * 0.5))
    assert torch.equal(ps[1], before[1] * (1 - 1e-2 * 1e-2))  # the default weight decay, bitsandbytes' 1e-2


def test_checkpoint_round_trip_continues_like_an_uninterrupted_run(tmp_path):
    whole = params()
    run(ours, whole, steps=4)
    first = params()
    opt = run(ours, first, steps=2)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    loaded = ours(resumed)
    loaded.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    assert all(loaded.state[p]["state1"].dtype == torch.float32 for p in resumed)  # not cast to bf16
    run(lambda _: loaded, resumed, steps=2, start=2)
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole, strict=True))


def test_loads_a_bitsandbytes_checkpoint_with_float32_states():
    ps = params()
    ref = run(bnb_paged, ps, steps=2)
    opt = ours([torch.nn.Parameter(p.detach().clone()) for p in ps])
    opt.load_state_dict(ref.state_dict())
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        assert torch.equal(opt.state[p]["state2"], ref.state[q]["state2"]) and opt.state[p]["step"] == 2


def test_trainer_gets_this_optimizer_for_paged_adamw_32bit_only(tmp_path):
    from transformers import TrainingArguments

    def args(optim):
        return TrainingArguments(output_dir=str(tmp_path), optim=optim, learning_rate=3e-4, report_to="none")

    cls, kwargs = trainer_optimizer(args("paged_adamw_32bit"))
    assert cls is PagedAdamW32bit and kwargs == {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8}
    assert trainer_optimizer(args("adamw_torch")) is None
    assert trainer_optimizer(args("paged_adamw_8bit")) is None


@pytest.mark.gpu
def test_same_parameters_and_paged_states_as_bitsandbytes_on_gpu():
    opt = check_same_as_bitsandbytes("cuda", torch.bfloat16, big=True)
    big = opt.param_groups[1]["params"][-1]
    assert getattr(opt.state[big]["state1"], "is_paged", False)  # paged like bitsandbytes' for large tensors
    assert not getattr(opt.state[opt.param_groups[0]["params"][0]]["state1"], "is_paged", False)
    sd = opt.state_dict()  # waits for the GPU before the host reads the paged states
    assert torch.isfinite(sd["state"][3]["state2"]).all()
