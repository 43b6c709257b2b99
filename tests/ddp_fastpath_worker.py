"""Run by tests/test_distributed.py under torchrun (gloo): each process trains the tiny model on finechat's fast path
(fused layers, checkpointing that recomputes inside backward) wrapped in DistributedDataParallel with finechat's
DDP options, on its half of a batch for three SGD steps, and saves the gradients DDP left on its adapter weights.
The test compares them with one process on the whole batch (build, batch and train below, shared by both). With
"graphs" as third argument the layers go through finechat.layer_graphs' bookkeeping with forward and backward
"graphs" that CPU replays (tests/test_layer_graphs.CPUGraphs): the backward's parameter gradients then reach DDP as
the checkpoint's outputs. With "accumulate" each step is two micro-batches, the first without the all-reduce. With
"shapes" the steps take turns between two sequence lengths (LENGTHS), so the graphs of two shapes share their memory
(finechat.layer_graphs). With "packed" each process's rows go in as one packed row of records (finechat.packing), as
`finechat train --packing` sends them: the same tokens to predict, so the same gradients as the unpacked batch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from finechat import distributed, fastpath, packing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS, SEQ, STEPS = 4, 32, 3  # steps: eager, captured, replayed
LENGTHS = (SEQ, 24)  # with "shapes": step i trains on the first LENGTHS[i % 2] tokens of each row, 2 x STEPS steps


def build(model_dir: str, graphs: bool = False):
    """The tiny model on the fast path with a LoRA whose B is not zero (so every adapter weight gets a gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = fastpath.prepare(model, gradient_checkpointing=True, require_cuda=False)
    if graphs:
        from test_layer_graphs import CPUGraphs

        shared = CPUGraphs(backward_enabled=True)
        for layer in fastpath._decoder_layers(model) or []:
            layer._graphs = shared
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.train()


def batch(vocab_size: int) -> torch.Tensor:
    """The same ROWS x SEQ token ids in every process."""
    return torch.randint(3, vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))


def packed(rows: torch.Tensor) -> dict:
    """rows as one packed row: each row a record, its first token not a target (the inputs of a training forward)."""
    n, length = rows.shape
    ids = rows.reshape(1, -1)
    labels = ids.clone()
    labels[0, length::length] = -100  # (the row's first token is never a target)
    cu = torch.arange(0, n * length + 1, length, dtype=torch.int32)
    segments = packing.Segments(cu=cu, longest=length, positions=torch.arange(length).repeat(n)[None])
    return {"input_ids": ids, "labels": labels, "segments": segments}


def train(
    model, step_model, ids: torch.Tensor, micro: int = 1, lengths: tuple[int, ...] = (SEQ,), pack: bool = False
) -> list[dict[str, torch.Tensor]]:
    """STEPS SGD steps per length of step_model (the model, or its DDP wrapper) on ids cut to the lengths in turn,
    each accumulated over `micro` equal micro-batches (under DDP all but the last without the all-reduce, as the
    Trainer does), each packed into one row when pack; the adapter gradients of each step."""
    from contextlib import nullcontext

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sgd = torch.optim.SGD(params.values(), lr=0.5)
    grads = []
    for step in range(STEPS * len(lengths)):
        for i, part in enumerate(ids[:, : lengths[step % len(lengths)]].chunk(micro)):
            last = i == micro - 1
            with nullcontext() if last or not hasattr(step_model, "no_sync") else step_model.no_sync():
                inputs = packed(part) if pack else {"input_ids": part, "labels": part}
                (step_model(**inputs).loss / micro).backward()
        grads.append({name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None})
        sgd.step()
        sgd.zero_grad(set_to_none=True)
    return grads


def main(
    model_dir: str,
    out: Path,
    graphs: bool = False,
    micro: int = 1,
    lengths: tuple[int, ...] = (SEQ,),
    pack: bool = False,
) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(model_dir, graphs)
    layers = model.get_base_model().model.layers
    assert all(isinstance(layer, fastpath.FastDecoderLayer) for layer in layers)
    recomputed = []  # the fast layers' outputs come from finechat.offload's checkpoint, not from plain autograd
    layers[0].register_forward_hook(lambda m, i, o: recomputed.append(type(o.grad_fn).__name__))
    ddp = DistributedDataParallel(model, **distributed.DDP_OPTIONS)
    rows = ROWS // world
    ids = batch(model.config.vocab_size)[rank * rows : (rank + 1) * rows]
    grads = train(model, ddp, ids, micro, lengths, pack)
    replayed = layers[0]._graphs.captured_backward() if graphs else 0
    torch.save({"grads": grads, "recomputed": recomputed, "backward_graphs": replayed}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    flags = sys.argv[3:]
    main(
        sys.argv[1],
        Path(sys.argv[2]),
        graphs="graphs" in flags,
        micro=2 if "accumulate" in flags else 1,
        lengths=LENGTHS if "shapes" in flags else (SEQ,),
        pack="packed" in flags,
    )
