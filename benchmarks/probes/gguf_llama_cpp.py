"""CPU probe: `finechat merge --gguf` files run by llama.cpp itself (through llama-cpp-python), against transformers
on the merged folder. Not a test (llama-cpp-python is a source build, about 8 minutes on 2 cores); a check for the
README's claim, run by hand:

    python3 -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python
    LLAMA_PYTHON=/tmp/llamavenv/bin/python .venv/bin/python benchmarks/probes/gguf_llama_cpp.py [output.json]

It trains the demo's SmolLM2 for 2 steps, merges it with --gguf as f16 and q8_0, and compares for one chat prompt:
the token ids of llama.cpp's tokenizer and the greedy continuation (24 tokens) from llama.cpp and from transformers'
generate on the merged folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from finechat.cli import main as finechat

WORK = Path("/tmp/finechat-gguf-probe")
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TYPES = ("f16", "q8_0")
LLAMA = """
import json, sys
from llama_cpp import Llama
prompt, out = sys.argv[1], {}
for path in sys.argv[2:]:
    llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    text = llm.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    out[path] = {"ids": ids, "text": text}
print(json.dumps(out))
"""


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = WORK / "run"
    train = ["train", "--config", "smollm2-demo", "--output", str(run), "--max-steps", "2", "--batch-size", "2"]
    assert finechat([*train, "--max-seq-length", "64", "--max-eval-docs", "4", "--overwrite"]) == 0
    files = []
    for kind in TYPES:
        merged = WORK / f"merged-{kind}"
        merge = ["merge", "--adapter", str(run), "--output", str(merged), "--gguf", "--gguf-type", kind]
        assert finechat([*merge, "--overwrite"]) == 0
        files.append(str(merged / f"{merged.name}-{kind}.gguf"))
    llama = subprocess.run(
        [os.environ.get("LLAMA_PYTHON", "python3"), "-c", LLAMA, PROMPT, *files],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(llama.stdout.strip().splitlines()[-1])
    folder = WORK / f"merged-{TYPES[0]}"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    reply = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    want = tokenizer.decode(reply, skip_special_tokens=True)
    result = {"prompt": PROMPT, "transformers": {"ids": ids[0].tolist(), "text": want}, "rows": []}
    for kind, path in zip(TYPES, files, strict=True):
        row = {"gguf_type": kind, **got[path]}
        row["same_ids"] = row["ids"] == ids[0].tolist()
        row["same_text"] = row["text"].strip() == want.strip()
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
