"""Paged AdamW with 32-bit states (the seed recipe's optimizer) without a device synchronization per parameter.

bitsandbytes 0.50's `PagedAdamW32bit.step` calls `torch.cuda.synchronize()` after updating each parameter. A LoRA
on the 7 projections of Mistral-7B has 448 adapter tensors, so every step waits for the GPU 448 times, and between
those waits the GPU has one tiny kernel to run: the profiled H200 step at 8x1024 spent 59 ms in the optimizer,
nearly all of it idle. This optimizer keeps bitsandbytes' arithmetic and memory layout exactly and drops the waits:
- the same state per parameter: `step`, `state1` and `state2` (float32), paged (CUDA managed memory, prefetched to
  the GPU before each update) from 100,000 elements up, as bitsandbytes allocates them;
- the same update: bitsandbytes' own 32-bit Adam kernel (`bitsandbytes.functional.optimizer_update_32bit`) called
  with the arguments `bnb.optim.PagedAdamW32bit` passes, so parameters and states are bitwise equal to its;
- no synchronization inside the step: every kernel that reads or writes a state runs on the current stream, in
  order, and the prefetches go to the legacy default stream, which orders with it. The host reads paged states (they
  are CPU tensors over managed memory) only through `state_dict()`, which waits for the GPU first.
Checkpoints hold the same state keys as bitsandbytes' optimizer, and loading one keeps the states in float32 (torch's
default would cast them to a bf16 parameter's dtype)."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

PAGED_FROM = 100_000  # bitsandbytes pages states of parameters with at least this many elements
_BNB_NESTED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict puts state1 and state2


class PagedAdamW32bit(torch.optim.Optimizer):
    """AdamW with float32 states in paged memory: bitsandbytes' PagedAdamW32bit, one device wait less per tensor."""

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

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        import bitsandbytes.functional as bnbf

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["state1"] = self._state_buffer(p)
                    state["state2"] = self._state_buffer(p)
                for s in (state["state1"], state["state2"]):
                    if getattr(s, "is_paged", False):
                        bnbf.prefetch_tensor(s)
                if not p.is_contiguous():  # bitsandbytes' kernel reads flat memory (its optimizer does the same)
                    p.data = p.data.contiguous()
                state["step"] += 1
                bnbf.optimizer_update_32bit(
                    "adam",
                    p.grad.contiguous(),
                    p,
                    state["state1"],
                    beta1,
                    group["eps"],
                    state["step"],
                    group["lr"],
                    state["state2"],
                    beta2,
                    0.0,  # beta3, alpha: AdEMAMix only
                    0.0,
                    group["weight_decay"],
                    1.0,  # gnorm_scale
                    None,  # no update-norm clipping (max_unorm 0)
                    max_unorm=0.0,
                    skip_zeros=False,
                )
        return loss

    def _state_buffer(self, p: torch.Tensor) -> torch.Tensor:
        """A zeroed float32 state shaped like p: paged on CUDA for large parameters, as bitsandbytes does."""
        if not (self.paged and p.is_cuda and p.numel() >= PAGED_FROM):
            return torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        import bitsandbytes.functional as bnbf

        buf = bnbf.get_paged(*p.shape, dtype=torch.float32, device=p.device)
        bnbf.fill(buf, 0)
        return buf

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, after the GPU has finished writing the paged states (the host reads those)."""
        if torch.cuda.is_available() and any(getattr(s.get("state1"), "is_paged", False) for s in self.state.values()):
            torch.cuda.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of bitsandbytes' (which nests the states under one key), keeping
        the states in float32."""
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_param = {p: state_dict["state"][i] for i, p in zip(ids, params, strict=False) if i in state_dict["state"]}
        super().load_state_dict(state_dict)  # groups and hyper-parameters; the states are replaced below
        for p, saved in by_param.items():
            saved = {**saved, **saved.get(_BNB_NESTED, {})}
            state: dict[str, Any] = {"step": int(saved["step"])}
            for key in ("state1", "state2"):
                buf = self._state_buffer(p)
                buf.copy_(saved[key].reshape(p.shape))  # float32 into float32: exact
                state[key] = buf
            self.state[p] = state


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
