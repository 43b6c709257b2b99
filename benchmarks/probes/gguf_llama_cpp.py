"""CPU probe: `finechat merge --gguf` files run by llama.cpp itself (through llama-cpp-python), against transformers
on the merged folder. Not a test (llama-cpp-python is a source build, about 8 minutes on 2 cores); a check for the
README's claim, run by hand:

    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python
    LLAMA_PYTHON=/tmp/llamavenv/bin/python .venv/bin/python benchmarks/probes/gguf_llama_cpp.py [output.json]

It trains the demo's SmolLM2 for 2 steps, merges it with --gguf as f16 and q8_0 (its tokenizer copied from the
shipped GGUF), and compares for one chat prompt: the token ids of llama.cpp's tokenizer and the greedy continuation
(24 tokens, as text and as token ids) from llama.cpp and from transformers' generate on the merged folder. Then the same for the tests' tiny
random Llama (float32), whose GGUF tokenizer is built from its byte-level BPE tokenizer.json, with a second text of
digits and punctuation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from finechat.cli import main as finechat

WORK = Path("/tmp/finechat-gguf-probe")
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SPLIT = "The history of Paris, France: 1,234 people in 2023's census.  Two  spaces. <s>[INST] Hi [/INST]"
TYPES = ("f16", "q8_0")
LLAMA = """
import json, sys
from llama_cpp import Llama
prompt, split, out = sys.argv[1], sys.argv[2], {}
for path in sys.argv[3:]:
    llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    split_ids = llm.tokenize(split.encode(), add_bos=False, special=True)
    text = llm.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    llm.reset()
    reply = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        reply.append(token)
        if len(reply) == 24 or token == llm.token_eos():
            break
    out[path] = {"ids": ids, "split_ids": split_ids, "text": text, "reply_ids": reply}
print(json.dumps(out))
"""


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = WORK / "run"
    train = ["train", "--config", "smollm2-demo", "--output", str(run), "--max-steps", "2", "--batch-size", "2"]
    assert finechat([*train, "--max-seq-length", "64", "--max-eval-docs", "4", "--overwrite"]) == 0
    cases = []  # (model, GGUF type, merged folder)
    for kind in TYPES:
        merged = WORK / f"merged-{kind}"
        merge = ["merge", "--adapter", str(run), "--output", str(merged), "--gguf", "--gguf-type", kind]
        assert finechat([*merge, "--overwrite"]) == 0
        cases.append(("smollm2", kind, merged))
    cases.append(("tiny", "f32", tiny_merged()))
    cases.append(("tiny-sentencepiece", "f32", tiny_merged(sentencepiece=True)))
    files = [str(folder / f"{folder.name}-{kind}.gguf") for _, kind, folder in cases]
    llama = subprocess.run(
        [os.environ.get("LLAMA_PYTHON", "python3"), "-c", LLAMA, PROMPT, SPLIT, *files],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(llama.stdout.strip().splitlines()[-1])
    result: dict = {"prompt": PROMPT, "split_text": SPLIT, "rows": []}
    for (name, kind, folder), path in zip(cases, files, strict=True):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        reply = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        want = tokenizer.decode(reply, skip_special_tokens=True)
        row = {"model": name, "gguf_type": kind, **got[path], "transformers_text": want}
        row["same_reply_ids"] = row["reply_ids"] == reply.tolist()[: len(row["reply_ids"])]
        row["same_ids"] = row["ids"] == ids[0].tolist()
        row["same_split_ids"] = row["split_ids"] == tokenizer(SPLIT)["input_ids"]
        row["same_text"] = row["text"].strip() == want.strip()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


def tiny_merged(sentencepiece: bool = False) -> Path:
    """The tests' tiny random Llama (its tokenizer a byte-level BPE tokenizer.json), or with sentencepiece a tiny
    random Mistral with the tests' SentencePiece-style tokenizer.json (tests/fixtures/sp-bpe), trained 2 steps on
    Wikipedia leads and merged with --gguf as float32."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    sys.path.insert(0, str(tests))
    from conftest import build_model, sentencepiece_tokenizer, tiny_config, wiki_texts
    from finechat.merge import merge
    from finechat.train import train

    root = WORK / ("tiny-sp" if sentencepiece else "tiny")
    tokenizer = sentencepiece_tokenizer() if sentencepiece else None  # (None: the tests' byte-level one)
    model_dir = build_model(root / "model", arch="mistral" if sentencepiece else "llama", tokenizer=tokenizer)
    text = root / "wiki.txt"
    text.write_text("\n".join(f" = A{i} = \n\n {t} \n" for i, t in enumerate(wiki_texts(40))))
    train(tiny_config(model_dir, text, root / "run", max_steps=2, max_eval_docs=2), overwrite=True)
    return merge(str(root / "run"), str(root / "merged"), gguf=True, gguf_type="f32", overwrite=True)


if __name__ == "__main__":
    main()
