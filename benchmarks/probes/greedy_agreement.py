"""GPU probe: where the engine's greedy tokens part from plain `generate`'s on the random Mistral-7B.

Decode rounds 3-8 read `greedy_equal` 25 of 128 (bf16) and 7 (NF4), while the small-model GPU tests kept passing;
this probe found the one-kernel RMSNorm (since removed) as the cause: with it off, 128 of 128. For each weight type this feeds generate's own tokens through the decoder step by step and reports the
first step whose logits are not bit for bit generate's, with the decoder's options turned off one at a time, plus the
top-2 gap of generate's logits where the tokens part. Not a test; a diagnosis.

    PYTHONPATH=src python benchmarks/probes/greedy_agreement.py [bf16,nf4]
"""

import json
import sys
import threading
from pathlib import Path

import torch

from finechat import decode
from finechat.bench.common import save_word_tokenizer
from finechat.bench.generate import _greedy
from finechat.bench.train import ARCHS, make_random_model
from finechat.engine import Engine
from finechat.models import load_for_inference

N = 128


def plain(model, ids):
    x = torch.tensor([ids], device="cuda")
    out = model.generate(
        x,
        max_new_tokens=N,
        min_new_tokens=N,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(ids) :].tolist(), [
        s[0].float() for s in out.logits
    ]  # raw logits (scores carry min_new_tokens' -inf at EOS)


def first_logit_difference(engine, ids, tokens, scores):
    """Feed generate's tokens through the decoder; the first step whose logits differ, and by how much."""
    decoder = engine.batcher.decoder
    with engine.lock, torch.inference_mode():
        logits = decoder.prefill(0, ids).float()
        for i in range(len(tokens)):
            if not torch.equal(logits[0], scores[i]):
                return {"first_differing_step": i, "max_abs": round((logits[0] - scores[i]).abs().max().item(), 5)}
            logits = decoder.step([tokens[i]], [len(ids) + i]).float()
    return {"first_differing_step": None}


def gap(scores, i):
    top = scores[i].topk(2).values
    return round((top[0] - top[1]).item(), 6)


def variant(name, model, tokenizer, ids, tokens, scores, **kw):
    engine = Engine(model, tokenizer, max_batch=kw.pop("max_batch", 16), **kw)
    engine.warm_up()
    got = [t for t in engine.tokens(ids, _greedy(N), threading.Event()) if t is not None]
    same = next((i for i, (a, b) in enumerate(zip(got, tokens, strict=False)) if a != b), len(got))
    row = {"variant": name, "greedy_equal": same, "gap_there": gap(scores, same) if same < N else None}
    d = engine.batcher.decoder if engine.batcher else None
    if d is not None:
        row.update(
            fused=d.fused_check,
            kv=d.kv_check,
            nf4_one=d.nf4_one_check,
            graphs=d.graphs,
            **first_logit_difference(engine, ids, tokens, scores),
        )
    engine.close()
    print(json.dumps(row), flush=True)
    return row


def main():
    weights = (sys.argv[1] if len(sys.argv) > 1 else "bf16,nf4").split(",")
    decode.avoid_cudnn_attention()
    path = make_random_model("mistral-7b", Path("/tmp/finechat-bench-mistral-7b"))
    vocab = ARCHS["mistral-7b"]["vocab_size"]
    if not (path / "tokenizer.json").is_file():
        save_word_tokenizer(path, vocab)
    ids = torch.randint(3, vocab, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    for w in weights:
        model, tokenizer = load_for_inference(
            str(path), quantize="nf4" if w == "nf4" else "none", compute_dtype="bfloat16"
        )
        tokens, scores = plain(model, ids)
        again, _ = plain(model, ids)
        print(
            json.dumps(
                {
                    "weights": w,
                    "generate_repeats_itself": again == tokens,
                    "gap_min_first_32": min(gap(scores, i) for i in range(32)),
                }
            ),
            flush=True,
        )
        variant(f"{w} default", model, tokenizer, ids, tokens, scores)
        variant(f"{w} one slot", model, tokenizer, ids, tokens, scores, max_batch=1)
        variant(f"{w} fused off", model, tokenizer, ids, tokens, scores, max_batch=1, fused="off")
        variant(f"{w} graphs off", model, tokenizer, ids, tokens, scores, max_batch=1, graphs=False)
        joined = decode.Decoder._joined_kv
        decode.Decoder._joined_kv = lambda self: None
        variant(f"{w} kv joined off", model, tokenizer, ids, tokens, scores, max_batch=1)
        decode.Decoder._joined_kv = joined
        if w == "nf4":
            choose = decode.Decoder.choose_nf4_one
            decode.Decoder.choose_nf4_one = lambda self: setattr(self, "nf4_one_check", "off (probe)")
            variant(f"{w} nf4 one-row off", model, tokenizer, ids, tokens, scores, max_batch=1)
            decode.Decoder.choose_nf4_one = choose
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
