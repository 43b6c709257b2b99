"""Command-line interface: parses arguments and dispatches to the command modules; holds no logic of its own.
Heavy libraries are imported inside the commands so `finechat --help` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from finechat import config as cfg
from finechat.errors import UserError

LENGTHS = ("short", "medium", "long", "very-long")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (plus its long name when the short flag differs); defaults come later."""
    for f in cfg.fields():
        names = [f"--{cfg.flag_for(f.name)}"]
        if cfg.flag_for(f.name) != f.name.replace("_", "-"):
            names.append("--" + f.name.replace("_", "-"))
        t = cfg.field_type(f)
        help_text = (
            f"{f.metadata['help']} (default: {f.default if f.default is not None else 'none'})"
            if not isinstance(f.default, type(cfg.dataclasses.MISSING))
            else f.metadata["help"]
        ).replace("%", "%%")  # argparse formats help strings with %
        if t is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(*names, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub id, model folder, .gguf file, run folder, or smollm2")
    p.add_argument(
        "--length",
        choices=LENGTHS,
        default=None,
        help="reply length preset: short=100, medium=250, long=500, very-long=20000 tokens",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="reply budget in tokens (overrides --length)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for repeatable replies")
    p.add_argument(
        "--no-stop-at-punctuation",
        dest="stop_at_punctuation",
        action="store_false",
        help="cut replies exactly at the budget instead of at the next sentence end",
    )
    p.add_argument(
        "--quantize",
        choices=cfg.QUANTIZE_CHOICES,
        default="none",
        help="load the base in 4-bit NF4 (GPU) or full precision",
    )


def build_parser() -> argparse.ArgumentParser:
    """The finechat argument parser with all subcommands."""
    parser = _Parser(
        prog="finechat", description="Fine-tune a chat model with QLoRA, evaluate it, merge it and talk to it."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="LoRA/QLoRA supervised fine-tuning into a run folder")
    p.add_argument("--config", help="YAML preset (see configs/); flags override its values")
    p.add_argument("--resume", action="store_true", help="continue the run folder from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "--gpus", type=int, default=None, help="train on N GPUs of this machine (re-runs itself under torchrun)"
    )
    _train_flags(p)

    p = sub.add_parser("eval", help="perplexity on held-out text")
    p.add_argument("--model", required=True, help="base model spec, or a run folder")
    p.add_argument("--adapter", help="run folder whose adapter is applied to --model")
    p.add_argument("--data", help="held-out data (default: the run's heldout.jsonl)")
    p.add_argument(
        "--max-seq-length", type=int, default=None, help="tokens per scored block (default: the run's, else 512)"
    )
    p.add_argument("--max-docs", type=int, default=0, help="score at most this many documents")
    p.add_argument("--quantize", choices=cfg.QUANTIZE_CHOICES, default="none", help="base weights for scoring")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("merge", help="merge a run's adapter into the full-precision base")
    p.add_argument("--adapter", required=True, help="run folder written by finechat train")
    p.add_argument("--model", help="base model (default: the base recorded in the run folder)")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged folder")
    p.add_argument(
        "--gguf",
        action="store_true",
        help="also write the merged model as one GGUF file in the folder (llama.cpp, Ollama, LM Studio)",
    )
    p.add_argument(
        "--gguf-type", default="f16", help="what the GGUF file's matrices are stored as: f16, bf16, q8_0, f32"
    )
    p.add_argument("--push-to-hub", help="Hub repo id to upload the merged model to")

    p = sub.add_parser("generate", help="one reply to one prompt (reply on stdout)")
    _engine_flags(p)
    p.add_argument("--prompt", required=True, help="the user message")

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    _engine_flags(p)
    p.add_argument("--system", help="system message for the conversation")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page")
    p.add_argument("--model", required=True, help="Hub id, model folder, .gguf file, run folder, or smollm2")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FINECHAT_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on every /v1 request (default: $FINECHAT_API_KEY, which keeps the "
        "key out of the process list)",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=4, help="generations running at once; later requests wait (default: 4)"
    )
    p.add_argument("--quantize", choices=cfg.QUANTIZE_CHOICES, default="none", help="load the base in 4-bit NF4 (GPU)")

    p = sub.add_parser("demo", help="the offline demo: train SmolLM2 on Wikipedia leads, evaluate, merge, reply")
    p.add_argument("--output", default="runs/demo", help="run folder (replaced if it is an earlier demo run)")

    p = sub.add_parser("bench", help="GPU measurements behind docs/benchmarks.md")
    bench = p.add_subparsers(dest="bench_command", required=True, parser_class=_Parser)
    _bench_train_flags(bench.add_parser("train", help="training tokens/s and peak memory: seed stack vs finechat"))
    _bench_generate_flags(
        bench.add_parser("generate", help="decoding tokens/s and time to first token: seed vs engine")
    )
    bench.add_parser(
        "multigpu",
        help="training tokens/s and memory: one GPU, DDP and FSDP-QLoRA (--help for its flags)",
        add_help=False,
    )
    return parser  # `finechat bench multigpu ...`: main() hands its flags to finechat.bench.multigpu


def _bench_train_flags(p: argparse.ArgumentParser) -> None:
    from finechat.bench.train import ARCHS, DEFAULT_SHAPES, SYSTEMS

    p.add_argument("--arch", choices=list(ARCHS), default="mistral-7b", help="random-weight model architecture")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"batch x sequence pairs (default: {DEFAULT_SHAPES})")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"what to measure (default: {','.join(SYSTEMS)})")
    p.add_argument("--steps", type=int, default=5, help="timed steps per shape (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout of seed and finechat (default: 0.05)")
    p.add_argument("--longest", default="", help="single-sequence lengths to train once on finechat, e.g. 131072")
    p.add_argument("--ablation-shapes", default="8x1024", help="shapes for the finechat-* ablation systems")
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="measure each ablation N times, each right after finechat as it is, and report the median gain "
        "(default: 0, one ablation row per shape)",
    )
    p.add_argument("--profile", default="", help="shapes at which to profile one finechat step, e.g. 8x1024")
    p.add_argument(
        "--padding",
        type=float,
        default=0.0,
        help="right-pad the batches as chat records are, this fraction of their tokens on average (default: 0, "
        "full rows as packed text)",
    )
    p.add_argument("--memory-cap-gib", type=float, default=79.0, help="GPU memory cap; 0: whole card (default: 79)")
    p.add_argument("--model-dir", help="folder for the random model (default: /tmp/finechat-bench-ARCH)")
    p.add_argument("--output", help="JSON path (default: benchmarks/results/train-CARD-DATE.json)")


def _bench_generate_flags(p: argparse.ArgumentParser) -> None:
    from finechat.bench.generate import WEIGHTS
    from finechat.bench.train import ARCHS

    p.add_argument("--arch", choices=list(ARCHS), default="mistral-7b", help="random-weight model architecture")
    p.add_argument("--weights", default=",".join(WEIGHTS), help=f"weight formats (default: {','.join(WEIGHTS)})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the speed runs (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per reply (default: 128)")
    p.add_argument("--long-prompt", type=int, default=1000, help="prompt length of the ttft run (default: 1000)")
    p.add_argument("--streams", default="1,4,16", help="concurrent streams through the engine (default: 1,4,16)")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the engine without CUDA graphs")
    p.add_argument(
        "--no-unfused", dest="unfused", action="store_false", help="skip the engine without the fused decode kernels"
    )
    p.add_argument("--model-dir", help="folder for the random model (default: /tmp/finechat-bench-ARCH)")
    p.add_argument("--output", help="JSON path or folder (default: benchmarks/results/decode-CARD-DATE.json)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the finechat console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = list(argv)
    while command[:1] in (["-v"], ["--verbose"]):  # finechat's own flag, before the command
        command = command[1:]
    if command[:2] == ["bench", "multigpu"]:  # its own flags (python -m finechat.bench.multigpu takes the same)
        from finechat.bench import multigpu

        return multigpu.main(command[2:], prog="finechat bench multigpu")
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        sys.stderr.write(f"finechat {args.command}: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"\nfinechat {args.command}: interrupted\n")
        return 130


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="finechat: %(message)s", stream=sys.stderr)
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes", "httpx", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars; finechat shows its own training progress


def _settings(args: argparse.Namespace):
    from finechat.engine import GenerationSettings, length_tokens

    budget = args.max_new_tokens if args.max_new_tokens is not None else length_tokens(args.length or "medium")
    if budget <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {budget}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
    return GenerationSettings(
        max_new_tokens=budget,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_punctuation=args.stop_at_punctuation,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finechat import distributed
    from finechat.train import train

    overrides: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in cfg.fields() if getattr(args, f.name) is not None
    }
    config_path = args.config
    if args.resume and not config_path and overrides.get("run_dir"):
        saved = Path(overrides["run_dir"]) / "config.yaml"
        config_path = str(saved) if saved.is_file() else None  # a resumed run keeps its own settings
    config = cfg.load_config(config_path, overrides)
    distributed.relaunch(args, Path(config.run_dir))  # --gpus N: becomes torchrun, running N copies of this command
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if not distributed.is_main_process():
        return 130 if result.interrupted else 0  # rank 0 reports for the run
    if result.interrupted:
        print(
            f"interrupted at step {result.step}; checkpoint saved in {result.run_dir}/checkpoints — continue with --resume"
        )
        return 130
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    print(
        f"train loss {loss} | held-out perplexity {result.eval_perplexity:.3f} | "
        f"{result.tokens_per_s:.0f} tokens/s | {result.step} steps | run folder {result.run_dir}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from finechat.evaluate import evaluate

    result = evaluate(
        args.model,
        args.data,
        adapter=args.adapter,
        max_seq_length=args.max_seq_length,
        max_docs=args.max_docs,
        quantize=args.quantize,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"perplexity {result.perplexity:.3f} | loss {result.loss:.4f} nats/token | {result.tokens} tokens")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from finechat.gguf_export import file_name
    from finechat.merge import merge

    out = merge(
        args.adapter,
        args.output,
        model_spec=args.model,
        overwrite=args.overwrite,
        gguf=args.gguf,
        gguf_type=args.gguf_type,
    )
    print(f"merged model written to {out}")
    if args.gguf:
        print(f"GGUF file: {out / file_name(out.name, args.gguf_type)}")
    if args.push_to_hub:
        from finechat.hub import push

        print(f"uploaded to {push(out, args.push_to_hub)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from finechat.chat import generate
    from finechat.engine import Engine

    settings = _settings(args)
    if not args.prompt.strip():
        raise UserError("--prompt is empty; pass the message to reply to")
    generate(Engine.load(args.model, quantize=args.quantize), args.prompt, settings)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from finechat.chat import chat
    from finechat.engine import Engine

    settings = _settings(args)
    chat(Engine.load(args.model, quantize=args.quantize), settings, system=args.system)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from finechat.server import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        quantize=args.quantize,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from finechat.demo import run_demo

    return run_demo(args.output)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "generate":
        return cmd_bench_generate(args)
    from finechat.bench.train import BenchSettings, parse_lengths, parse_shapes, run

    if args.steps <= 0 or args.warmup < 0:
        raise UserError("--steps must be positive and --warmup not negative")
    if args.pairs < 0:
        raise UserError(f"--pairs {args.pairs}: expected 0 (no pairs) or a positive count")
    if not 0 <= args.padding < 0.5:
        raise UserError(f"--padding {args.padding}: expected a fraction in [0, 0.5)")
    settings = BenchSettings(
        arch=args.arch,
        shapes=parse_shapes(args.shapes),
        systems=[s.strip() for s in args.systems.split(",") if s.strip()],
        steps=args.steps,
        warmup=args.warmup,
        lora_dropout=args.lora_dropout,
        longest=parse_lengths(args.longest),
        ablation_shapes=parse_shapes(args.ablation_shapes) if args.ablation_shapes else [],
        pairs=args.pairs,
        profile_shapes=parse_shapes(args.profile) if args.profile else [],
        padding=args.padding,
        memory_cap_gib=args.memory_cap_gib or None,
        model_dir=args.model_dir,
        output=args.output,
    )
    run(settings, command="finechat bench train " + " ".join(sys.argv[3:]))
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from finechat.bench.generate import DecodeBenchSettings, parse_counts, run

    if min(args.prompt_tokens, args.new_tokens, args.long_prompt) < 2:
        raise UserError("--prompt-tokens, --new-tokens and --long-prompt must be at least 2")
    settings = DecodeBenchSettings(
        arch=args.arch,
        weights=[w.strip() for w in args.weights.split(",") if w.strip()],
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        long_prompt=args.long_prompt,
        streams=parse_counts(args.streams, "--streams"),
        eager=args.eager,
        unfused=args.unfused,
        model_dir=args.model_dir,
        output=args.output,
    )
    run(settings, command="finechat bench generate " + " ".join(sys.argv[3:]))
    return 0


COMMANDS = {
    "bench": cmd_bench,
    "train": cmd_train,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "demo": cmd_demo,
    "serve": cmd_serve,
}
