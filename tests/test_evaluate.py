import math

import pytest
import torch

from finechat import data
from finechat.errors import UserError
from finechat.evaluate import evaluate, perplexity
from finechat.models import load_base, load_tokenizer


def test_perplexity_is_token_weighted_and_skips_masked_tokens(tiny_model_dir):
    model = load_base(str(tiny_model_dir), compute_dtype="float32")
    examples = [{"input_ids": [5, 6, 7, 8, 9], "assistant_masks": [0, 0, 1, 1, 1]}, {"input_ids": [10, 11, 12]}]
    result = perplexity(model, examples, batch_size=2)
    nll, n = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        mask = e.get("assistant_masks", [1] * len(e["input_ids"]))
        for t in range(1, len(e["input_ids"])):
            if mask[t]:
                nll -= float(logp[t - 1, e["input_ids"][t]])
                n += 1
    assert result.tokens == n == 3 + 2
    assert result.loss == pytest.approx(nll / n, rel=1e-4) and result.perplexity == pytest.approx(
        math.exp(nll / n), rel=1e-4
    )


def test_eval_on_a_text_file(tiny_model_dir, text_file):
    result = evaluate(str(tiny_model_dir), str(text_file), max_seq_length=64, max_docs=3)
    tok = load_tokenizer(str(tiny_model_dir))
    blocks = data.tokenize(data.load_corpus(str(text_file)).records[:3], tok, 64)
    assert result.tokens == sum(len(b["input_ids"]) - 1 for b in blocks)
    assert 50 < result.perplexity < 5000  # a random model on a 512-token vocabulary


def test_eval_needs_data_without_a_run(tiny_model_dir):
    with pytest.raises(UserError, match="--data is required"):
        evaluate(str(tiny_model_dir), None)
