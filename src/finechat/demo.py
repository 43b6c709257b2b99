"""`make demo` / `finechat demo`: the whole pipeline offline on 2 CPU cores — train, evaluate, merge, reply."""

from __future__ import annotations

import time
from pathlib import Path

from finechat import config as cfg
from finechat import runs

PROMPT = "Tell me about the history of the printing press."


def run_demo(output: str) -> int:
    """Train the smollm2-demo preset, compare held-out perplexity before and after, merge, and print two replies."""
    from finechat.chat import generate
    from finechat.engine import Engine, GenerationSettings, length_tokens
    from finechat.evaluate import evaluate
    from finechat.merge import merge
    from finechat.train import train

    run_dir = Path(output)
    merged_dir = run_dir.with_name(run_dir.name + "-merged")
    config = cfg.load_config("smollm2-demo", {"run_dir": str(run_dir)})
    timings: dict[str, float] = {}

    print(
        f"== 1/4 train: {config.model} on {config.data}, {config.max_steps} steps of "
        f"{config.batch_size}x{config.max_seq_length} tokens, QLoRA ({config.quantize}) -> {run_dir}",
        flush=True,
    )
    t = time.perf_counter()
    result = train(config, overwrite=(run_dir / "finechat.json").is_file())
    timings["train"] = time.perf_counter() - t
    print(
        f"train loss {result.train_loss:.4f} | {result.tokens_per_s:.0f} tokens/s | {timings['train']:.0f} s",
        flush=True,
    )

    print("== 2/4 evaluate held-out perplexity (the run's heldout.jsonl) before and after", flush=True)
    t = time.perf_counter()
    before = evaluate(config.model, str(run_dir / "heldout.jsonl"), max_seq_length=config.max_seq_length)
    after = evaluate(config.model, None, adapter=str(run_dir))
    timings["eval"] = time.perf_counter() - t
    print(
        f"perplexity before {before.perplexity:.3f} -> after {after.perplexity:.3f} ({after.tokens} tokens)", flush=True
    )

    print(f"== 3/4 merge the adapter into the full-precision base -> {merged_dir}", flush=True)
    t = time.perf_counter()
    merge(str(run_dir), str(merged_dir), overwrite=(merged_dir / "finechat-merge.json").is_file())
    timings["merge"] = time.perf_counter() - t

    print("== 4/4 reply from the merged model", flush=True)
    t = time.perf_counter()
    engine = Engine.load(str(merged_dir))
    for length in ("short", "medium"):
        print(f"\n[{length}] you> {PROMPT}\nbot> ", end="", flush=True)
        generate(engine, PROMPT, GenerationSettings(max_new_tokens=length_tokens(length)))
    timings["generate"] = time.perf_counter() - t

    runs.write_meta(
        run_dir,
        demo={
            "perplexity_before": before.perplexity,
            "perplexity_after": after.perplexity,
            "seconds": {k: round(v, 1) for k, v in timings.items()},
        },
    )
    total = sum(timings.values())
    print("\n== done in " + f"{total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    print(f"try: finechat chat --model {merged_dir}")
    return 0 if after.perplexity < before.perplexity else 1
