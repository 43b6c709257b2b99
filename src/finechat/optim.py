"""Paged AdamW with 32-bit states (the seed recipe's optimizer), updating all adapter tensors in one kernel.

bitsandbytes 0.50's `PagedAdamW32bit.step` updates one parameter at a time and calls `torch.cuda.synchronize()`
after each. A LoRA on the 7 projections of Mistral-7B has 448 adapter tensors, so every step waits for the GPU 448
times, and between those waits the GPU has one tiny kernel to run: the profiled H200 step at 8x1024 spent 59 ms in
the optimizer, nearly all of it idle. Without the waits (the first version of this module) the step still launched
448 updates and 896 prefetches from the host: 18-27 ms a step on an H200 with the GPU mostly idle. This optimizer
keeps bitsandbytes' arithmetic exactly and does the work in a handful of kernels:
- the same update: bitsandbytes' own 32-bit Adam kernel (`bitsandbytes.functional.optimizer_update_32bit`) with
  the arguments `bnb.optim.PagedAdamW32bit` passes. The kernel is elementwise, so running it once over all the
  parameters of a group laid end to end (their values and gradients gathered with one `torch.cat` each, the results
  copied back with one multi-tensor copy) gives parameters and states bitwise equal to one call per parameter;
- the same state per parameter: `step`, `state1` and `state2` (float32). The states of a group's parameters are
  slices of two flat buffers, paged (CUDA managed memory, prefetched to the GPU before each update) when the group
  holds at least 100,000 elements, the size from which bitsandbytes pages a parameter's states;
- no synchronization inside the step: every kernel that reads or writes a state runs on the current stream, in
  order, and the prefetches go to the legacy default stream, which orders with it. The host reads paged states (they
  are CPU tensors over managed memory) only through `state_dict()`, which waits for the GPU first.
A step where some parameter of a group has no gradient updates that group's others one at a time, as bitsandbytes
does. Checkpoints hold the same state keys as bitsandbytes' optimizer, and loading one keeps the states in float32
(torch's default would cast them to a bf16 parameter's dtype)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

PAGED_FROM = 100_000  # bitsandbytes pages states of parameters with at least this many elements
_BNB_NESTED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict puts state1 and state2


class PagedAdamW32bit(torch.optim.Optimizer):
    """AdamW with float32 states in paged memory: bitsandbytes' PagedAdamW32bit, one update kernel per group."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,  # bitsandbytes' AdamW default (torch's is also 1e-2)
        paged: bool = True,
    ) -> None:
        if not lr >= 0.0 or not eps >= 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"PagedAdamW32bit: invalid lr={lr}, eps={eps} or betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.paged = paged
        self._flat: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # per partition: its flat state1, state2

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in _partitions(group["params"]):
                states = self._states(params)
                together = all(p.grad is not None and p.grad.dtype == p.dtype for p in params)
                if together and len({states[p]["step"] for p in params}) == 1:
                    for p in params:
                        states[p]["step"] += 1
                    flat = self._flat[_key(params)]
                    values = torch.cat([p.detach().reshape(-1) for p in params])
                    grads = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
                    self._update(group, values, grads, flat["state1"], flat["state2"], states[params[0]]["step"])
                    torch._foreach_copy_([p.detach() for p in params], _split(values, params))
                    continue
                for p in params:  # some parameter without a gradient: the others one at a time, as bitsandbytes
                    if p.grad is not None:
                        state = states[p]
                        state["step"] += 1
                        self._update(group, p, p.grad.contiguous(), state["state1"], state["state2"], state["step"])
        return loss

    def _update(self, group: dict[str, Any], p, grad, state1, state2, step: int) -> None:
        """bitsandbytes' 32-bit AdamW kernel on p (and its states) in place."""
        import bitsandbytes.functional as bnbf

        for s in (state1, state2):
            if getattr(s, "is_paged", False):
                bnbf.prefetch_tensor(s)
        beta1, beta2 = group["betas"]
        bnbf.optimizer_update_32bit(
            "adam",
            grad,
            p,
            state1,
            beta1,
            group["eps"],
            step,
            group["lr"],
            state2,
            beta2,
            0.0,  # beta3, alpha: AdEMAMix only
            0.0,
            group["weight_decay"],
            1.0,  # gnorm_scale
            None,  # no update-norm clipping (max_unorm 0)
            max_unorm=0.0,
            skip_zeros=False,
        )

    def _states(self, params: list[torch.Tensor]) -> dict[torch.Tensor, dict[str, Any]]:
        """The states of one partition's parameters, their state1 and state2 slices of the partition's two flat
        buffers: made on first use, and again (keeping the values) after a checkpoint was loaded."""
        key = _key(params)
        if key not in self._flat:
            flat = self._flat[key] = self._flat_buffers(params)
            for p, s1, s2 in zip(params, _split(flat["state1"], params), _split(flat["state2"], params), strict=True):
                if getattr(flat["state1"], "is_paged", False):  # slices prefetch their own pages
                    for view, buf in ((s1, flat["state1"]), (s2, flat["state2"])):
                        view.is_paged, view.page_deviceid = True, buf.page_deviceid  # type: ignore[attr-defined]
                old = self.state[p]
                for name, view in (("state1", s1), ("state2", s2)):
                    if name in old:
                        view.copy_(old[name].reshape(p.shape))  # float32 into float32: exact
                self.state[p] = {"step": int(old.get("step", 0)), "state1": s1, "state2": s2}
        return {p: self.state[p] for p in params}

    def _flat_buffers(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Two zeroed float32 buffers as long as the parameters together: paged on CUDA from PAGED_FROM elements."""
        n = sum(p.numel() for p in params)
        device = params[0].device
        if not (self.paged and device.type == "cuda" and n >= PAGED_FROM):
            return {name: torch.zeros(n, dtype=torch.float32, device=device) for name in ("state1", "state2")}
        import bitsandbytes.functional as bnbf

        buffers = {}
        for name in ("state1", "state2"):
            buffers[name] = bnbf.get_paged(n, dtype=torch.float32, device=device)
            bnbf.fill(buffers[name], 0)
        return buffers

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, after the GPU has finished writing the paged states (the host reads those)."""
        if torch.cuda.is_available() and any(getattr(f["state1"], "is_paged", False) for f in self._flat.values()):
            torch.cuda.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of bitsandbytes' (which nests the states under one key), keeping
        the states in float32 (they go into the flat buffers at the next step)."""
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_param = {p: state_dict["state"][i] for i, p in zip(ids, params, strict=False) if i in state_dict["state"]}
        super().load_state_dict(state_dict)  # groups and hyper-parameters; the states are replaced below
        self._flat.clear()
        for p, saved in by_param.items():
            saved = {**saved, **saved.get(_BNB_NESTED, {})}
            self.state[p] = {"step": int(saved["step"]), "state1": saved["state1"], "state2": saved["state2"]}


def _partitions(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """A group's parameters by device and dtype (one flat update each), in the group's order."""
    parts: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        parts.setdefault((p.device, p.dtype), []).append(p)
    return list(parts.values())


def _key(params: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(id(p) for p in params)


def _split(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of flat shaped like each parameter, end to end."""
    return [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]


def trainer_optimizer(args: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """(class, kwargs) for the Trainer's `optimizer_cls_and_kwargs` when args.optim is paged_adamw_32bit (this
    optimizer with the Trainer's own lr, betas and eps); None for any other optimizer, which the Trainer builds."""
    from transformers import Trainer

    if str(getattr(args.optim, "value", args.optim)) != "paged_adamw_32bit":
        return None
    _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if kwargs.get("optim_bits", 32) != 32 or not kwargs.get("is_paged", True):
        return None
    return PagedAdamW32bit, {k: kwargs[k] for k in ("lr", "betas", "eps") if k in kwargs}
