"""The bookkeeping of finechat.layer_graphs on CPU tensors (capture and replay need CUDA: the GPU test in
tests/test_fastpath.py checks that graphed steps give the eager steps' losses and gradients)."""

import pytest
import torch

from finechat.layer_graphs import MAX_SHAPES, LayerGraphs, _why


class AnyDevice(LayerGraphs):
    """LayerGraphs that keeps entries for CPU tensors too, to test which entries it keeps."""

    @staticmethod
    def _graphable(hidden: torch.Tensor) -> bool:
        return True


def entries(graphs, layers, hidden, cos, key="adapters"):
    return [graphs.entry(i, hidden, cos, None, 7, (key, i)) for i in range(layers)]


def test_each_layer_keeps_its_entry_across_steps():
    graphs, h, cos = AnyDevice(), torch.zeros(2, 8, 16), torch.zeros(1, 8, 4)
    first = entries(graphs, 32, h, cos)
    again = entries(graphs, 32, h, cos)
    assert all(a is b for a, b in zip(first, again, strict=True)) and len({id(e) for e in first}) == 32
    assert all(e.seeds.shape == (7,) and e.seeds.dtype == torch.int64 for e in first)


def test_a_layer_whose_adapters_change_gets_a_new_entry():
    graphs, h, cos = AnyDevice(), torch.zeros(2, 8, 16), torch.zeros(1, 8, 4)
    first = entries(graphs, 4, h, cos)
    changed = graphs.entry(2, h, cos, None, 7, ("other adapters", 2))
    assert changed is not first[2] and changed.key == ("other adapters", 2)
    assert [graphs.entry(i, h, cos, None, 7, ("adapters", i)) is first[i] for i in (0, 1, 3)] == [True] * 3


def test_only_the_latest_shapes_keep_their_entries():
    graphs, cos = AnyDevice(), torch.zeros(1, 8, 4)
    shapes = [torch.zeros(b, 8, 16) for b in range(1, MAX_SHAPES + 2)]
    kept = [entries(graphs, 3, h, cos) for h in shapes]
    assert len(graphs._entries) == 3 * MAX_SHAPES  # the oldest shape's went
    assert all(a is b for a, b in zip(entries(graphs, 3, shapes[-1], cos), kept[-1], strict=True))
    assert not any(a is b for a, b in zip(entries(graphs, 3, shapes[0], cos), kept[0], strict=True))


def test_masks_large_batches_cpu_and_switched_off_run_eagerly():
    h, cos = torch.zeros(2, 8, 16), torch.zeros(1, 8, 4)
    assert AnyDevice().entry(0, h, cos, torch.zeros(2, 1, 8, 8), 7, ()) is None  # an attention mask
    assert AnyDevice(max_tokens=15).entry(0, h, cos, None, 7, ()) is None  # 16 tokens
    assert AnyDevice(enabled=False).entry(0, h, cos, None, 7, ()) is None
    assert LayerGraphs().entry(0, h, cos, None, 7, ()) is None  # CPU


class Replayed:
    """A stand-in for a captured CUDA graph on CPU: replay() runs the captured work again."""

    def __init__(self, work):
        self.replay = work


class CPUGraphs(AnyDevice):
    """LayerGraphs whose 'capture' runs the work once and keeps it to run again: the buffers, the ring and the
    seeds behave as with CUDA graphs, without a GPU."""

    def _record(self, work, shape, device):
        work()
        return Replayed(work)


@pytest.mark.parametrize(("backward", "lengths"), [(False, (24,)), (True, (24,)), (True, (24, 16, 8))])
def test_replays_through_the_ring_give_the_eager_losses_and_grads(tmp_path, backward, lengths):
    """Four layers (more than the ring's three buffers), dropout, positions that shift, step 1 eager, 2 captured, 3
    and 4 replayed (the forwards, and with backward=True the recomputes and backwards too): the same losses and LoRA
    gradients as the eager layers, bit for bit, and a new mask at every step. With several lengths the batches take
    turns (each length eager, captured, replayed twice): the shapes' graphs share one pool, their buffers one arena
    and the layers' gradient buffers, and no shape's replay spoils another's."""
    from peft import LoraConfig, get_peft_model

    from conftest import build_model
    from finechat import fastpath, models

    folder = build_model(tmp_path / "m", "mistral", layers=4)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    runs = []
    for graphs in (None, CPUGraphs(backward_enabled=backward)):
        model = fastpath.prepare(models.load_base(str(folder), quantize="none"), require_cuda=False)
        for layer in fastpath._decoder_layers(model):
            layer._graphs = graphs or LayerGraphs(enabled=False)
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(model, lora)
        model.train()
        torch.manual_seed(5)  # the layers draw their dropout seeds from torch's generator
        batches = [torch.randint(0, model.config.vocab_size, (2, n)) for n in lengths]
        steps = []
        for step in range(4 * len(lengths)):
            ids = batches[step % len(lengths)]
            # positions shift each step, so the rotary tables differ: a graph that kept the capture step's tables
            # (not its own buffers, refilled at each replay) would give other gradients
            positions = (torch.arange(ids.shape[1]) + 5 * step).expand_as(ids)
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
            loss.backward()
            steps.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
            model.zero_grad(set_to_none=True)
        runs.append((steps, (graphs.captured(), graphs.captured_backward()) if graphs is not None else None))
    (eager, _), (replayed, captured) = runs
    assert captured == (4 * len(lengths), 4 * len(lengths) if backward else 0)
    for (want_loss, want), (got_loss, got) in zip(eager, replayed, strict=True):
        assert got_loss == want_loss and all(torch.equal(got[n], want[n]) for n in want)
    assert len({loss for loss, _ in eager}) == 4 * len(lengths)


def test_a_failed_capture_is_named_by_the_operation_that_failed_first():
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from None
    except RuntimeError as e:
        suppressed = _why(e)
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as e:
        chained = _why(e)
    assert suppressed == "RuntimeError: CUDA error: operation failed due to a previous error during capture"
    assert chained == (
        "RuntimeError: CUDA error: operation not permitted when stream is capturing"
        " (then RuntimeError: CUDA error: operation failed due to a previous error during capture)"
    )


@pytest.mark.gpu
def test_random_draws_work_after_a_failed_capture():
    """A capture that fails (here a host read inside it) leaves torch's CUDA generator as it was: the fast path's
    seeds are drawn with it after a failed capture, eagerly."""
    graphs, x = LayerGraphs(), torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError):
        graphs._record(lambda: x.sum().item(), ("shape",), x.device)
    assert torch.randint(0, 10, (4,), device="cuda").shape == (4,)
    assert torch.empty(3, dtype=torch.int64, device="cuda").random_(0, 5).max().item() < 5


def test_captured_shapes_stay_and_other_shapes_run_eagerly():
    """Batches of changing shapes (chat records padded to their lengths) do not capture and drop graphs without end:
    once MAX_SHAPES shapes hold graphs, a batch of another shape gets no entry (it runs eagerly)."""
    graphs, cos = AnyDevice(), torch.zeros(1, 8, 4)
    shapes = [torch.zeros(b, 8, 16) for b in range(1, MAX_SHAPES + 3)]
    kept = [entries(graphs, 2, h, cos) for h in shapes[:MAX_SHAPES]]
    for entry in [e for es in kept[:-2] for e in es]:
        entry.graph = "captured"  # every shape's graphs are captured but the last two shapes'
    later = entries(graphs, 2, shapes[MAX_SHAPES], cos)  # makes way: the oldest shape with no graph goes
    assert all(e is not None for e in later)
    assert all(a is b for a, b in zip(entries(graphs, 2, shapes[0], cos), kept[0], strict=True))
    kept_shapes = {shape[0] for _, shape in graphs._entries}
    assert tuple(shapes[MAX_SHAPES - 2].shape) not in kept_shapes and len(kept_shapes) == MAX_SHAPES  # it went
    for entry in kept[-1]:
        entry.graph = "captured"
    for entry in later:
        entry.backward_graph = "captured"
    assert entries(graphs, 2, shapes[MAX_SHAPES + 1], cos) == [None, None]  # every kept shape is captured
    assert all(a is b for a, b in zip(entries(graphs, 2, shapes[MAX_SHAPES], cos), later, strict=True))


def test_the_shape_limit_comes_from_the_config(tmp_path):
    """TrainConfig.cuda_graph_shapes (`--cuda-graph-shapes`) reaches the model's LayerGraphs, and must be positive."""
    from conftest import build_model
    from finechat import config as cfg
    from finechat import fastpath, models
    from finechat.errors import UserError

    assert cfg.load_config(None, {}).cuda_graph_shapes == MAX_SHAPES
    with pytest.raises(UserError, match="--cuda-graph-shapes must be a positive number, got 0"):
        cfg.load_config(None, {"cuda_graph_shapes": 0})
    model = models.load_base(str(build_model(tmp_path / "m", "mistral", layers=2)), quantize="none")
    model = fastpath.prepare(model, require_cuda=False, cuda_graph_shapes=3)
    graphs = fastpath.layer_graphs(model)
    assert graphs is not None and graphs.max_shapes == 3
    fastpath.set_options(model, cuda_graph_shapes=5)
    assert graphs.max_shapes == 5
