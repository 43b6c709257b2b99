"""The command line as a user meets it: one-line errors with exit code 2, nothing of theirs overwritten."""

import subprocess
import sys
import time

import pytest

from finechat.cli import build_parser, main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    import re

    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and re.search(pattern, lines[-1]), err
    assert "Traceback" not in err
    assert lines[-1].startswith("finechat")


@pytest.fixture
def base_args(tiny_model_dir, text_file, tmp_path):
    return [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(text_file),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--batch-size",
        "1",
        "--max-seq-length",
        "32",
        "--quantize",
        "none",
    ]


def test_help_is_instant():
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finechat", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout and "chat" in proc.stdout
    assert time.perf_counter() - t < 10  # no torch import for --help


def test_every_command_prints_its_help():
    from finechat import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        assert "usage:" in sub.format_help(), name
    assert "--no-keep-attention" in commands["train"].format_help()


def test_bad_input_through_the_real_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "finechat", "train", "--data", str(tmp_path / "none.jsonl")],
        capture_output=True,
        text=True,
    )
    one_line_error(proc.returncode, proc.stderr, r"--data .*none.jsonl: file not found")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"--data": "MISSING"}, r"--data .*missing.txt: file not found"),
        ({"--data": "EMPTY"}, r"no usable records"),
        ({"--data": "BROKEN"}, r"broken.jsonl:2: not valid JSON"),
        ({"--model": "./no-such-model"}, r"--model ./no-such-model: not found"),
        ({"--batch-size": "0"}, r"--batch-size must be a positive number, got 0"),
        ({"--max-seq-length": "-1"}, r"--max-seq-length must be a positive number"),
        ({"--lora-r": "0"}, r"--lora-r must be a positive number"),
        ({"--max-steps": "0"}, r"--max-steps must be a positive number"),
        ({"--batch-size": "two"}, r"--batch-size \(batch_size in a config file\): expected a whole number, got 'two'"),
        ({"--lr": "abc"}, r"--lr \(learning_rate in a config file\): expected a number, got 'abc'"),
        ({"--quantize": "int2"}, r"--quantize must be one of nf4, none"),
    ],
)
def test_train_bad_input(capsys, base_args, tmp_path, change, pattern):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    files = {
        "MISSING": tmp_path / "missing.txt",
        "EMPTY": tmp_path / "empty.jsonl",
        "BROKEN": tmp_path / "broken.jsonl",
    }
    args = list(base_args)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = str(files.get(value, value))
        else:
            args += [flag, str(files.get(value, value))]
    code, _, err = run_cli(capsys, *args)
    one_line_error(code, err, pattern)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_unknown_config_key(capsys, base_args, tmp_path):
    (tmp_path / "c.yaml").write_text("batch_sise: 4\n")
    code, _, err = run_cli(capsys, *base_args, "--config", str(tmp_path / "c.yaml"))
    one_line_error(code, err, r"unknown config key 'batch_sise' in .*c.yaml; valid keys: model, data, eval_data")


def test_existing_output_is_not_touched(capsys, base_args, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mine.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *base_args)
    one_line_error(code, err, r"--output .*run already exists; pass --resume to continue it or --overwrite")
    assert (tmp_path / "run" / "mine.txt").read_text() == "keep me"


def test_unknown_flag_and_length(capsys, tiny_model_dir):
    with pytest.raises(SystemExit) as e:
        main(["train", "--lora-rnk", "4"])
    assert e.value.code == 2
    assert "unrecognized arguments: --lora-rnk" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--length", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_generate_prints_only_the_reply_on_stdout(capsys, tiny_model_dir):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--no-stop-at-punctuation",
    )
    assert code == 0 and out.endswith("\n") and out.count("\n") >= 1
    from finechat.engine import Engine, GenerationSettings

    engine = Engine.load(str(tiny_model_dir))
    ids = engine.chat_prompt([{"role": "user", "content": "Hello"}], reserve=12)
    expected = engine.generate(ids, GenerationSettings(max_new_tokens=12, stop_at_punctuation=False)).complete().text
    assert out == expected + "\n"


def test_eval_json(capsys, tiny_model_dir, text_file):
    import json

    code, out, _ = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(text_file),
        "--max-docs",
        "2",
        "--max-seq-length",
        "32",
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["tokens"] > 0 and result["perplexity"] > 1


def test_serve_takes_its_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("FINECHAT_API_KEY", "from-env")
    assert build_parser().parse_args(["serve", "--model", "smollm2"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--model", "smollm2", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("FINECHAT_API_KEY")
    assert build_parser().parse_args(["serve", "--model", "smollm2"]).api_key is None
