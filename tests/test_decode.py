"""The fast decoder and continuous batching: greedy replies equal transformers' generate, concurrent generations
decode in one batch and get the replies they would get alone, cancelled or abandoned ones leave the batch, and what
the decoder does not cover falls back to step-by-step decoding. GPU tests check the CUDA-graph path."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from finechat import decode
from finechat.engine import Engine, GenerationSettings
from finechat.kernels import nf4_gemv, nf4_matmul


def greedy(n: int, **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, stop_at_punctuation=False, **kw)


def prompt(engine: Engine, i: int = 0) -> list[int]:
    return engine.chat_prompt([{"role": "user", "content": f"Question {i}: tell me about item {i * 7}."}])


def token_ids(engine: Engine, ids: list[int], n: int) -> list[int | None]:
    return list(engine.tokens(ids, greedy(n), threading.Event()))


def generate_ids(engine: Engine, ids: list[int], n: int) -> list[int]:
    out = engine.model.generate(torch.tensor([ids], device=engine.device), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def concurrently(engine: Engine, jobs: list[tuple[list[int], GenerationSettings]]) -> list:
    """Run the generations in threads that all submit while the engine is held, so they decode as one batch."""
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        results[i] = engine.generate(*jobs[i]).complete()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    with engine.lock:
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=120)
    return results


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.batcher.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.active == []


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), max_batch=4)
    yield engine
    engine.close()


def test_the_fast_decoder_runs_llama_and_mistral(engine, tiny_mistral_dir):
    assert engine.fast_off is None and engine.batcher is not None
    assert engine.batcher.decoder.capacity == engine.context_window == 512
    mistral = Engine.load(str(tiny_mistral_dir))
    ids = prompt(mistral)
    before = mistral.batcher.steps
    assert token_ids(mistral, ids, 48) == generate_ids(mistral, ids, 48)
    assert mistral.batcher.steps - before == 47  # the first token comes from the prefill
    mistral.close()


def test_decode_step_logits_equal_the_model_forward(engine):
    """A one-sequence step is the model's own cached forward exactly; a batched step agrees to float32 rounding."""
    from transformers import DynamicCache

    decoder, model = engine.batcher.decoder, engine.model
    a, b = prompt(engine, 1), prompt(engine, 2)[:-3]

    def reference(ids: list[int], fed: list[int]) -> list[torch.Tensor]:
        cache = DynamicCache(config=model.config)
        out = [model(torch.tensor([ids]), past_key_values=cache, logits_to_keep=1).logits[0, -1]]
        return out + [model(torch.tensor([[t]]), past_key_values=cache).logits[0, -1] for t in fed]

    with engine.lock, torch.inference_mode():
        ref_a, ref_b = reference(a, [5, 9]), reference(b, [7, 3])
        assert torch.equal(decoder.prefill(0, a)[0], ref_a[0])
        assert torch.equal(decoder.step([5], [len(a)])[0], ref_a[1])
        assert torch.equal(decoder.prefill(1, b)[0], ref_b[0])
        both = decoder.step([9, 7], [len(a) + 1, len(b)])
        torch.testing.assert_close(both[0], ref_a[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(both[1], ref_b[1], rtol=1e-5, atol=1e-5)
        decoder.move(1, 0, len(b) + 1)  # the first sequence leaves; the second moves down to slot 0
        torch.testing.assert_close(decoder.step([3], [len(b) + 1])[0], ref_b[2], rtol=1e-5, atol=1e-5)


def test_prompts_arriving_together_prefill_in_one_forward(engine):
    """Right-padded, masked: each row's logits and cached keys/values agree with its own prefill."""
    decoder = engine.batcher.decoder
    a, b, c = prompt(engine, 1), prompt(engine, 2)[:-5], prompt(engine, 3)[:-2]
    with engine.lock, torch.inference_mode():
        alone = [decoder.prefill(0, ids)[0] for ids in (a, b, c)]
        keys = decoder.keys[0][0, :, : len(c)].clone()
        together = decoder.prefill_many([2, 0, 1], [a, b, c])
        for got, want in zip(together, alone, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder.keys[0][1, :, : len(c)], keys, rtol=1e-5, atol=1e-5)
        # slots side by side, as the batcher fills them: the cache is copied a layer at a time
        together = decoder.prefill_many([1, 2, 3], [b, c, a])
        torch.testing.assert_close(together[1], alone[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder.keys[0][2, :, : len(c)], keys, rtol=1e-5, atol=1e-5)


def test_concurrent_generations_decode_in_one_batch_and_equal_one_at_a_time(engine):
    """Different prompt lengths and budgets, so requests join and leave mid-batch and the cache is compacted;
    a stop string and a seeded sampler ride along."""
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([10, 25, 40, 17, 33])]
    full = engine.generate(*jobs[1]).complete().text
    jobs.append((jobs[1][0], greedy(25, stop=[full[len(full) // 2 : len(full) // 2 + 3]])))
    jobs.append((prompt(engine, 9), GenerationSettings(max_new_tokens=30, temperature=1.0, seed=3)))
    alone = [engine.generate(*job).complete() for job in jobs]
    assert alone[5].finish_reason == "stop" and len(alone[5].text) < len(full)
    engine.batcher.largest = 0
    together = concurrently(engine, jobs)
    assert engine.batcher.largest == 4  # four slots, the rest waited for a free one
    assert together == alone
    wait_idle(engine)


def test_a_cancelled_generation_stops_and_leaves_the_batch(engine):
    cancel = threading.Event()
    generation = engine.generate(prompt(engine, 3), greedy(400), cancel)
    pieces = iter(generation)
    next(pieces)
    cancel.set()
    "".join(pieces)
    assert generation.result.finish_reason == "cancelled" and generation.result.completion_tokens < 400
    wait_idle(engine)


def test_an_abandoned_generation_leaves_the_batch(engine):
    steps = engine.batcher.steps
    pieces = iter(engine.generate(prompt(engine, 5), greedy(400)))
    next(pieces)
    pieces.close()  # the reader stops reading, as a server thread does when its client goes
    wait_idle(engine)
    assert engine.batcher.steps - steps < 399


def test_the_next_step_is_launched_before_the_last_tokens_are_handed_out(engine):
    """Readers woken by a step's tokens must not hold up the next step: it is on the GPU before they are handed out."""
    from finechat.batching import END, Batcher, Request

    class Recording:  # the engine's decoder, noting how many tokens the reader had when each step was launched
        def __init__(self, decoder):
            self.decoder, self.seen = decoder, []

        def __getattr__(self, name):
            return getattr(self.decoder, name)

        def step(self, tokens, positions):
            self.seen.append(request.out.qsize())
            return self.decoder.step(tokens, positions)

    recording = Recording(engine.batcher.decoder)
    batcher = Batcher(recording, eos_ids=[], lock=engine.lock)  # no EOS: exactly 5 tokens
    request = Request(prompt(engine), 5, None, threading.Event())
    batcher.submit(request)
    deadline = time.monotonic() + 60
    while request.out.qsize() < 6 and time.monotonic() < deadline:  # read nothing until the end: qsize counts
        time.sleep(0.01)
    batcher.close()
    items = [request.out.get(timeout=1) for _ in range(6)]
    assert items[-1] is END and all(isinstance(t, int) for t in items[:-1])
    # the prefill hands out token 1; step k (k = 1..4) is launched while token k is still the last one handed out
    assert recording.seen == [1, 1, 2, 3]


def test_a_step_that_fails_to_launch_still_hands_out_the_last_tokens_then_the_error(engine):
    from finechat.batching import Batcher, Request

    class Failing:  # the engine's decoder, whose second step fails to launch
        def __init__(self, decoder):
            self.decoder, self.calls = decoder, 0

        def __getattr__(self, name):
            return getattr(self.decoder, name)

        def step(self, tokens, positions):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("launch failed")
            return self.decoder.step(tokens, positions)

    batcher = Batcher(Failing(engine.batcher.decoder), eos_ids=[], lock=engine.lock)
    request = Request(prompt(engine), 5, None, threading.Event())
    batcher.submit(request)
    items = [request.out.get(timeout=60) for _ in range(3)]
    batcher.close()
    assert isinstance(items[0], int) and isinstance(items[1], int)  # the prefill's token, then the first step's
    assert isinstance(items[2], RuntimeError) and "launch failed" in str(items[2])


def test_a_model_the_decoder_does_not_cover_decodes_step_by_step(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(decode, "unsupported_reason", lambda model: "model type 'x'")
    engine = Engine.load(str(tiny_model_dir))
    assert engine.batcher is None and engine.fast_off == "model type 'x'"
    ids = prompt(engine)
    assert token_ids(engine, ids, 30) == generate_ids(engine, ids, 30)


def test_a_request_longer_than_a_slot_decodes_step_by_step(tiny_model_dir, monkeypatch):
    # A tiny-model position takes 2 layers x (k, v) x 2 heads x 16 dims x 4 bytes = 512 bytes: 256 positions fit.
    monkeypatch.setattr(decode, "CPU_CACHE_BYTES", 256 * 512)
    engine = Engine.load(str(tiny_model_dir))
    assert engine.batcher.decoder.capacity == 256
    ids = prompt(engine)
    steps = engine.batcher.steps
    assert token_ids(engine, ids, 300 - len(ids)) == generate_ids(engine, ids, 300 - len(ids))
    assert engine.batcher.steps == steps  # it never went through the batcher
    assert token_ids(engine, ids, 20) == generate_ids(engine, ids, 20)
    assert engine.batcher.steps == steps + 19
    engine.close()


def test_ensure_batch_rebuilds_the_cache_for_more_slots(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    assert engine.batcher.decoder.slots == 1
    engine.ensure_batch(3)
    assert engine.batcher.decoder.slots == 3 and engine.max_batch == 3
    engine.ensure_batch(2)
    assert engine.batcher.decoder.slots == 3
    ids = prompt(engine)
    assert token_ids(engine, ids, 20) == generate_ids(engine, ids, 20)
    engine.close()


class Replay:
    """A CUDA graph's stand-in on CPU: replay() reruns the recorded function and writes the results into the tensors
    the recording returned, as a graph replay overwrites its static outputs."""

    def __init__(self, fn):
        self.fn, self.out = fn, fn()

    def replay(self) -> None:
        flat = lambda out: list(out) if isinstance(out, tuple) else [out]  # noqa: E731
        for static, new in zip(flat(self.out), flat(self.fn()), strict=True):
            static.copy_(new)


def test_the_graph_path_feeds_each_piece_the_right_tensors(tiny_model_dir):
    """The piecewise one-sequence graphs and the batched graphs, recorded with Replay, give the eager replies."""
    engine = Engine.load(str(tiny_model_dir), max_batch=4)
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([12, 30, 50, 21, 44, 9])]
    alone, together = [engine.generate(*job).complete() for job in jobs], concurrently(engine, jobs)
    decoder = engine.batcher.decoder
    with engine.lock, torch.inference_mode():
        decoder.capture_steps(lambda fn, pool: (r := Replay(fn), r.out), None)
    assert decoder.graphs and len(decoder.one_graphs) == len(decoder.layers) + 1
    assert sorted(decoder.batch_graphs) == [(b, n) for b in (2, 4) for n in (64, 128, 256, 512)]
    assert [engine.generate(*job).complete() for job in jobs] == alone
    assert concurrently(engine, jobs) == together
    engine.close()


# ---------------------------------------------------------------------------------------------------------------------
# The fused decode kernels, under Triton's CPU interpreter (TRITON_INTERPRET=1). The interpreter's exp and rsqrt are
# numpy's, and it truncates float32 to bfloat16, so exact checks run in float16, whose rounding numpy does right.


@pytest.fixture(scope="module")
def interpreted():
    import importlib
    import os

    pytest.importorskip("triton")
    from finechat.kernels import decode_ops, nf4_matmul, nf4_triton

    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    # The kernels are built for the interpreter from here, whichever test imported their modules first (a suite that
    # compiled nf4_triton for sm_90 before left it unable to launch on the CPU: "0 active drivers").
    importlib.reload(nf4_triton)
    decode_ops._kernels.cache_clear()
    nf4_matmul._kernel.cache_clear()
    yield decode_ops
    if before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = before
    importlib.reload(nf4_triton)
    decode_ops._kernels.cache_clear()
    nf4_matmul._kernel.cache_clear()


def test_fused_norm_and_rotary_kernels_round_as_the_modules_do(interpreted):
    ops = interpreted
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.float16)

    a, b = rand(3, 1, 96), rand(3, 1, 96)
    s, sq = ops.add_square(a, b)
    assert torch.equal(s, a + b) and torch.equal(sq, (a + b).float().pow(2))
    weight, variance = rand(96), sq.mean(-1, keepdim=True)
    assert torch.equal(ops.rms_apply(s, variance, weight, 1e-5), ops.rms_apply_reference(s, variance, weight, 1e-5))
    # batched steps' one-kernel norm: its own summation order, so equal to rounding only
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(weight, requires_grad=False), 1e-5
    s1, out = ops.rms_norm(norm, a, b, exact=False)
    assert torch.equal(s1, a + b)
    torch.testing.assert_close(out, ops.rms_norm(norm, a, b)[1], rtol=2e-3, atol=2e-3)
    assert torch.equal(ops.rms_norm(norm, s, None, exact=False)[0], s)  # no residual: s is the input itself
    rows, heads, kv_heads, dim, capacity = 2, 4, 2, 16, 8
    q, (k, v) = rand(rows, heads * dim), rand(rows, 2 * kv_heads * dim).chunk(2, -1)  # k, v: slices of one product
    angle = torch.randn(rows, dim // 2, generator=gen)
    cos, sin = (torch.cat([f(angle), f(angle)], -1).to(torch.float16) for f in (torch.cos, torch.sin))
    keys, values = torch.zeros(3, kv_heads, capacity, dim, dtype=torch.float16), None
    values = torch.zeros_like(keys)
    positions = torch.tensor([5, 2])
    q_out = ops.rope_into_cache(q, k, v, cos, sin, positions, keys, values)
    assert torch.equal(q_out[:, :, 0], ops.rope_reference(q.view(rows, heads, dim), cos, sin))
    k_rot = ops.rope_reference(k.view(rows, kv_heads, dim), cos, sin)
    assert torch.equal(keys[0, :, 5], k_rot[0]) and torch.equal(keys[1, :, 2], k_rot[1])
    assert torch.equal(values[1, :, 2], v.view(rows, kv_heads, dim)[1])
    assert keys.count_nonzero() == values.count_nonzero() == rows * kv_heads * dim  # nothing else written
    g, u = rand(2, 1, 300), rand(2, 1, 300)
    torch.testing.assert_close(ops.silu_mul(g, u), ops.silu_mul_reference(g, u), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fused_decoding_gives_generates_tokens(interpreted, tiny_mistral_dir, dtype):
    """The fused step is checked bit for bit against the modules' step when the decoder is built (float16 passes
    even under the interpreter; in float32 numpy's exp may differ from torch's in the last bit, so the float32 run
    asks for the kernels whatever the check says), and greedy replies, alone and batched, equal transformers'
    generate."""
    from finechat.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_mistral_dir))
    model = model.to(getattr(torch, dtype))
    engine = Engine(model, tokenizer, max_batch=3, fused="auto" if dtype == "float16" else "on")
    engine.warm_up()
    decoder = engine.batcher.decoder
    assert decoder.fused and decoder.fused_check == "bitwise" if dtype == "float16" else decoder.fused
    # one k/v product is kept only where bit-for-bit two (float16 "auto"), always with "on" (float32)
    assert (decoder.kv_weights is not None) == (decoder.kv_check == "bitwise" or dtype == "float32")
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([20, 35, 12])]
    alone = [token_ids(engine, ids, n.max_new_tokens) for ids, n in jobs]
    assert alone == [generate_ids(engine, ids, n.max_new_tokens) for ids, n in jobs]
    texts = [engine.generate(*job).complete() for job in jobs]
    assert concurrently(engine, jobs) == texts
    engine.close()


def test_batched_nf4_steps_use_the_4bit_product_and_equal_one_at_a_time(interpreted, tiny_mistral_dir):
    """NF4 weights with float32 compute: batched steps go through finechat.kernels.nf4_matmul (bitsandbytes would
    dequantize whole weights), one-row steps through bitsandbytes; concurrent replies equal the ones alone."""
    from finechat.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_mistral_dir), quantize="nf4", compute_dtype="float32")
    engine = Engine(model, tokenizer, max_batch=3, fused="on")  # float32: numpy's exp may differ in the last bit
    engine.warm_up()
    decoder = engine.batcher.decoder
    assert decoder.fused and decoder.nf4_check == "close" and decoder.nf4_way == "finechat"  # no timing off CUDA
    # q, k and v of each layer in one launch at every batch size (64, 32 and 32 rows: whole 32-row tiles)
    assert decoder.nf4_qkv == {b: "finechat" for b in decoder.batch_sizes if b > 1} and decoder.nf4_qkv
    assert "q/k/v in one product" in decoder.nf4_summary
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([20, 35, 12])]
    alone = [engine.generate(*job).complete() for job in jobs]
    engine.batcher.largest = 0
    assert concurrently(engine, jobs) == alone
    assert engine.batcher.largest == 3
    engine.close()


def test_fused_kernels_stay_off_when_their_step_differs(interpreted, tiny_mistral_dir, monkeypatch):
    from finechat.models import load_for_inference

    silu_mul = interpreted.silu_mul
    monkeypatch.setattr(interpreted, "silu_mul", lambda g, u: silu_mul(g, u) * 1.01)  # a kernel that rounds wrong
    model, tokenizer = load_for_inference(str(tiny_mistral_dir))
    engine = Engine(model.half(), tokenizer)
    engine.warm_up()
    assert engine.batcher.decoder.fused_check == "differs" and not engine.batcher.decoder.fused
    ids = prompt(engine)
    assert token_ids(engine, ids, 30) == generate_ids(engine, ids, 30)
    engine.close()


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the CUDA-graph path


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "quantize"), [("llama", "none"), ("mistral", "nf4")])
def test_graphs_greedy_equals_generate_on_gpu(tiny_model_dir, tiny_mistral_dir, arch, quantize):
    """With the fused kernels, which the decoder runs only when its step is bit-for-bit the modules' step."""
    folder = tiny_model_dir if arch == "llama" else tiny_mistral_dir
    engine = Engine.load(str(folder), quantize=quantize, compute_dtype="bfloat16")
    assert engine.batcher is not None and engine.batcher.decoder.graphs
    assert engine.batcher.decoder.fused_check == "bitwise" and engine.batcher.decoder.fused
    for i in range(3):
        ids = prompt(engine, i)
        assert token_ids(engine, ids, 64) == generate_ids(engine, ids, 64)
    engine.close()


@pytest.mark.gpu
def test_one_row_nf4_steps_give_bitsandbytes_bits_on_gpu(tmp_path, monkeypatch):
    """A model whose NF4 products finechat.kernels.nf4_gemv covers (inputs of 1,024 and 2,048): the decoder uses it
    only when it is bit for bit bitsandbytes' (here also when not faster), and greedy replies still equal
    generate's."""
    from conftest import build_model

    monkeypatch.setattr(decode, "NF4_ONE_MIN_SPEEDUP", 0.0)
    folder = build_model(tmp_path / "wide", arch="mistral", hidden=1024, heads=16)
    engine = Engine.load(str(folder), quantize="nf4", compute_dtype="bfloat16")
    decoder = engine.batcher.decoder
    assert decoder.graphs and decoder.nf4_one_check.startswith("bitwise (") and decoder.nf4_one
    assert decoder.nf4_one_speedup is not None and decoder.nf4_one_speedup > 0
    assert set(decoder.nf4_one_times) == {"bitsandbytes", *nf4_gemv.LOOKUPS}, decoder.nf4_one_times  # all bitwise
    for i in range(3):
        ids = prompt(engine, i)
        assert token_ids(engine, ids, 64) == generate_ids(engine, ids, 64)
    engine.close()


def test_batched_nf4_steps_in_pieces_of_four_rows_equal_one_at_a_time(interpreted, tiny_mistral_dir):
    """The third way of batched NF4 products: bitsandbytes' own call on pieces of at most four rows."""
    from finechat.models import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_mistral_dir), quantize="nf4", compute_dtype="float32")
    engine = Engine(model, tokenizer, max_batch=6, fused="on")
    engine.warm_up()
    decoder = engine.batcher.decoder
    assert decoder.nf4_check == "close"
    decoder.nf4_way = "pieces"
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([20, 35, 12, 18, 25, 9])]
    alone = [engine.generate(*job).complete() for job in jobs]
    engine.batcher.largest = 0
    assert concurrently(engine, jobs) == alone
    assert engine.batcher.largest > decode.NF4_PIECE_ROWS
    engine.close()


@pytest.mark.gpu
def test_batched_graphs_equal_one_at_a_time_in_float32_on_gpu(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), compute_dtype="float32", max_batch=4)
    decoder = engine.batcher.decoder
    assert decoder.graphs and (4, 512) in decoder.batch_graphs
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([12, 30, 50, 21, 44, 9])]
    alone = [engine.generate(*job).complete() for job in jobs]
    together = concurrently(engine, jobs)
    assert engine.batcher.largest == 4
    assert together == alone
    engine.close()


@pytest.mark.gpu
def test_batched_nf4_steps_use_the_4bit_product_on_gpu(tiny_mistral_dir):
    """NF4 weights, float32 compute: batched steps through finechat.kernels.nf4_matmul give the replies one at a
    time gives."""
    engine = Engine.load(str(tiny_mistral_dir), quantize="nf4", compute_dtype="float32", max_batch=8)
    decoder = engine.batcher.decoder
    assert decoder.graphs and decoder.nf4_check == "timed"
    # every captured batch size and NF4 weight shape got the fastest way of a timing at load
    shapes = {tuple(m.weight.quant_state.shape) for m in decoder._projections(0)}
    assert set(decoder.nf4_ways) == {(b, *shape) for b in decoder.batch_sizes for shape in shapes}
    assert all(
        t[decoder.nf4_ways[tuple(map(int, k.split("x")))]] == min(t.values()) for k, t in decoder.nf4_times.items()
    )
    # q, k and v in one launch timed at every batch size it serves (round 13: a device sync inside
    # nf4_matmul_parts failed the timing's graph capture, and the three products ran apart), kept only where its
    # fastest setting beat the three products' chosen ways
    assert set(decoder.nf4_qkv_times) == {str(b) for b in decoder.batch_sizes if 1 < b <= nf4_matmul.MAX_ROWS}
    attention = decoder.layers[0].self_attn
    qkv = [tuple(m.weight.quant_state.shape) for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
    for b, way in decoder.nf4_qkv.items():
        apart = sum(decoder.nf4_times[f"{b}x{n}x{k}"][decoder.nf4_ways[b, n, k]] for n, k in qkv)
        assert decoder.nf4_qkv_times[str(b)][way] == min(decoder.nf4_qkv_times[str(b)].values()) <= apart
    jobs = [(prompt(engine, i), greedy(n)) for i, n in enumerate([12, 30, 50, 21, 44, 9])]
    alone = [engine.generate(*job).complete() for job in jobs]
    assert concurrently(engine, jobs) == alone
    engine.close()
