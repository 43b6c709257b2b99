"""Multi-process training on CPU: real torchrun processes over gloo on the tiny model must train exactly like one
process with the same global batch, stop together on Ctrl-C, resume, and leave one plain-peft adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import output_or_stacks, press_ctrl_c
from finechat import cli, distributed, runs
from finechat import config as cfg
from finechat.errors import UserError

STEPS = 40
FSDP_CPU_SIM = Path(__file__).parent / "fsdp_cpu_sim"


def flags(model_dir, data, run_dir, batch_size: int, steps: int = STEPS, save_steps: int = 100) -> list[str]:
    """`finechat train` flags of a tiny deterministic run (no LoRA dropout: the processes draw different masks)."""
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(run_dir),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(batch_size),
        "--max-seq-length",
        "64",
        "--save-steps",
        str(save_steps),
        "--quantize",
        "none",
        "--compute-dtype",
        "float32",
        "--lora-dropout",
        "0",
        "--max-eval-docs",
        "4",
        "--eval-fraction",
        "0.1",
    ]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r}


def cpu_env() -> dict[str, str]:
    """No GPUs, and Python stacks of every thread on SIGABRT (output_or_stacks sends it to a run that hangs)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on CPU; GPUs: benchmarks/run_multigpu_bench.sh")
def test_two_processes_train_like_one_stop_together_and_resume(tiny_model_dir, text_file, tmp_path):
    """2 processes x batch 2 under torchrun == 1 process x batch 4, step by step, through a Ctrl-C and --resume."""
    assert cli.main(flags(tiny_model_dir, text_file, tmp_path / "one", 4)) == 0

    run_dir = tmp_path / "two"
    command = distributed.launch_command(flags(tiny_model_dir, text_file, run_dir, 2), 2)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(), start_new_session=True
    )
    # As from a terminal: torchrun gets the Ctrl-C and passes it on (it starts each process in a session of its own).
    press_ctrl_c(proc, run_dir, at_step=3)
    out, err = output_or_stacks(proc, timeout=120)  # about 3 s on 2 idle cores, 8 s on one loaded core
    assert "continue with --resume" in out, err
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]  # no launcher traceback either
    saved = runs.last_checkpoint(run_dir)
    assert saved is not None and 3 <= runs.checkpoint_step(saved) < STEPS, err
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in saved.iterdir()}  # both processes saved
    meta = json.loads((run_dir / "finechat.json").read_text())
    assert meta["status"] == "interrupted" and meta["processes"] == 2

    resume = distributed.launch_command(["train", "--output", str(run_dir), "--resume"], 2)
    proc = subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env())
    out, err = output_or_stacks(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("train loss") == 1  # rank 0 reports, rank 1 stays quiet

    # Only rank 0 wrote metrics: exactly one row per step, and they match one process with the same global batch.
    rows = [r["step"] for r in runs.read_metrics(run_dir) if "loss" in r]
    assert rows == list(range(1, STEPS + 1))
    one, two = losses(tmp_path / "one"), losses(run_dir)
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4
    assert json.loads((run_dir / "finechat.json").read_text())["status"] == "complete"

    # The adapter is the single-process one (same files, same weights) and loads with plain peft.
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    files = {p.name for p in run_dir.iterdir() if p.is_file()}
    assert files == {p.name for p in (tmp_path / "one").iterdir() if p.is_file()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU simulation of FSDP; GPUs run the real thing")
def test_fsdp_path_trains_like_one_process_and_resumes(tiny_model_dir, text_file, tmp_path):
    """FSDP (LoRA layers as their own units, adapter files, checkpoints, --resume) on CPU through tests/fsdp_cpu_sim,
    which removes only what keeps FSDP1 off CPUs: 2 x batch 2 == 1 x batch 4, step by step, through a resume."""
    reference = tmp_path / "one"
    assert cli.main(flags(tiny_model_dir, text_file, reference, 4, steps=6) + ["--optimizer", "adamw_torch"]) == 0
    env = {**cpu_env(), "FINECHAT_FSDP_CPU_SIM": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FSDP_CPU_SIM), env.get("PYTHONPATH")) if p)
    run_dir = tmp_path / "fsdp"
    first = flags(tiny_model_dir, text_file, run_dir, 2, steps=4, save_steps=2) + ["--distributed", "fsdp"]
    for argv in (first, ["train", "--output", str(run_dir), "--resume", "--max-steps", "6"]):
        done = subprocess.run(distributed.launch_command(argv, 2), capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()  # the Trainer ran FSDP

    one, two = losses(reference), losses(run_dir)
    assert sorted(two) == list(range(1, 7)) and max(abs(one[s] - two[s]) for s in one) < 1e-4
    from safetensors.torch import load_file

    a, b = load_file(reference / "adapter_model.safetensors"), load_file(run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    checkpoint = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert checkpoint.keys() == a.keys()  # not the empty adapter peft 0.21 writes for an FSDP model


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on CPU")
def test_bad_input_under_the_launcher_is_one_line_and_exit_2(tiny_model_dir, tmp_path):
    """Every process refuses the missing data file in one line; the launcher adds no traceback or report of its own."""
    argv = flags(tiny_model_dir, tmp_path / "missing.txt", tmp_path / "r", 2)
    done = subprocess.run(
        distributed.launch_command(argv, 2), capture_output=True, text=True, env=cpu_env(), timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors and all(line.startswith("finechat train: error: ") and "missing.txt" in line for line in errors)
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on CPU; GPUs: benchmarks/run_multigpu_bench.sh")
@pytest.mark.parametrize(
    "graphs,accumulate,shapes,packed",
    [
        (False, False, False, False),
        (True, False, False, False),
        (True, True, False, False),
        (True, True, True, False),
        (False, False, False, True),
        (True, False, False, True),
    ],
)
def test_fast_path_under_ddp_gives_the_whole_batch_gradients(
    tiny_model_dir, tmp_path, graphs, accumulate, shapes, packed
):
    """finechat's fast path recomputes each layer inside backward (finechat.offload), where DDP's gradient hooks
    fire: 2 processes x 2 rows under DDP with finechat's options get, in each of three steps, the gradients of 1
    process x 4 rows (so every hook fired once, and DDP averaged every bucket). graphs: the layers' forwards and
    backwards through finechat.layer_graphs (CPU stand-ins for the CUDA graphs), whose backward hands the parameters'
    gradients to autograd as the checkpoint's outputs. accumulate: each process's step is two micro-batches of one
    row, the first without the all-reduce (DDP's no_sync, as the Trainer runs gradient accumulation). shapes: the
    steps take turns between two sequence lengths, whose graphs share one memory pool and one arena of buffers.
    packed: each process's two rows go in as one packed row of two records (finechat.packing.Segments through DDP);
    the whole batch, unpacked, is the reference."""
    import ddp_fastpath_worker as worker

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [worker.__file__, str(tiny_model_dir), str(tmp_path)] + (["graphs"] if graphs else [])
    command += ["accumulate"] if accumulate else []
    command += ["shapes"] if shapes else []
    command += ["packed"] if packed else []
    done = subprocess.run(command, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    model = worker.build(str(tiny_model_dir))
    lengths = worker.LENGTHS if shapes else (worker.SEQ,)
    expected = worker.train(model, model, worker.batch(model.config.vocab_size), lengths=lengths)
    assert (
        len(expected) == worker.STEPS * len(lengths) and len(expected[0]) == 2 * 7 * 2
    )  # A, B of 7 projections, 2 layers
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(saved["recomputed"]) == {"_CheckpointBackward"}, saved["recomputed"]
        assert saved["backward_graphs"] == (2 * len(lengths) if graphs else 0)  # both layers, every length
        for step, (got, want) in enumerate(zip(saved["grads"], expected, strict=True)):
            assert got.keys() == want.keys(), step
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=f"{name}, step {step}")


def test_ddp_options_reach_accelerate(tiny_model_dir, text_file, tmp_path):
    """What accelerate hands DistributedDataParallel (find_unused_parameters=False is its default, so not listed)."""
    from datasets import Dataset

    from conftest import tiny_config
    from finechat import data, models
    from finechat.train import _build_trainer

    config = tiny_config(tiny_model_dir, text_file, tmp_path / "r")
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    examples = data.tokenize(data.load_corpus(str(text_file)).records[:8], tokenizer, 64)
    model = models.load_base(str(tiny_model_dir), compute_dtype="float32")
    plan = distributed.Plan("ddp", 2, 0)
    trainer = _build_trainer(config, model, tokenizer, Dataset.from_list(examples), None, tmp_path / "r", plan)
    kwargs = {"broadcast_buffers": False, "gradient_as_bucket_view": True, "bucket_cap_mb": 256}
    assert trainer.accelerator.ddp_handler.to_kwargs() == kwargs
    assert trainer.args.ddp_find_unused_parameters is False
    assert distributed.DDP_OPTIONS["find_unused_parameters"] is False


def _any_process_worker(rank: int, world: int, init: str, out: str) -> None:
    """One of test_any_process_agrees_over_the_host's processes."""
    from unittest import mock

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result = {"gloo": [distributed.any_process(rank == 1), distributed.any_process(False)]}
    assert distributed.host_group() is None  # gloo reduces host tensors itself
    with mock.patch.object(dist, "get_backend", return_value="nccl"):  # what the helper sees under NCCL
        group = distributed.host_group()
        result["nccl"] = [distributed.any_process(rank == 0), distributed.any_process(False)]
        result["made_once"] = distributed.host_group() is group
    result["group_backend"] = dist.get_backend(group)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _leave_group_worker(rank: int, world: int, folder: str, rounds: int) -> None:
    """One of test_leaving_the_group_under_ddp_never_hangs's processes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    for i in range(rounds):
        dist.init_process_group("gloo", init_method=f"file://{folder}/store{i}", rank=rank, world_size=world)
        model = DistributedDataParallel(torch.nn.Linear(8, 8))
        model(torch.randn(4, 8)).sum().backward()
        distributed.any_process(False)
        distributed.finish(distributed.Plan("ddp", world, rank))
        del model  # as the trainer goes when train() returns: DDP's Reducer lets go of the group
        Path(folder, f"rank{rank}").write_text(str(i + 1))


def test_leaving_the_group_under_ddp_never_hangs(tmp_path):
    """finish() and then the end of the DDP model, as at the end of every multi-process run, 30 times over: when the
    Reducer let go of the group last (with the GIL held, while gloo's worker thread waited for the GIL), a process
    hung within ~20 rounds."""
    import time

    import torch.multiprocessing as mp

    rounds = 30
    context = mp.spawn(_leave_group_worker, args=(2, str(tmp_path), rounds), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            done = [p.read_text() if p.exists() else "0" for p in (tmp_path / "rank0", tmp_path / "rank1")]
            pytest.fail(f"a process hung leaving the process group (rounds done: {done} of {rounds})")
    assert [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)] == [str(rounds)] * 2


def test_any_process_agrees_over_the_host(tmp_path):
    """Each process's Ctrl-C flag reaches the others over host tensors: on the default group under gloo, and under
    NCCL (faked: no GPUs here) over a gloo group of its own, made once, so the check never waits for the GPU."""
    import torch.multiprocessing as mp

    mp.spawn(_any_process_worker, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {
            "gloo": [True, False],
            "nccl": [True, False],
            "made_once": True,
            "group_backend": "gloo",
        }


def adapter_layout(path: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype) of a saved adapter file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in sorted(f.keys())}


def adapter_config(run_dir: Path) -> dict:
    """adapter_config.json, target_modules sorted (peft writes a set, in each process's hash order)."""
    config = json.loads((run_dir / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU simulation of FSDP; GPUs run the real thing")
def test_fsdp_qlora_adapter_is_saved_as_one_process_saves_it(tiny_model_dir, text_file, tmp_path):
    """QLoRA with bf16 mixed precision, as on GPUs: one process trains and saves the LoRA weights in bf16 (TRL casts
    them), while accelerate upcasts FSDP's trainable flat parameters to float32. Rank 0 must still write the
    single-process adapter (same names, shapes, dtypes, adapter_config.json), and --resume must go on from the float32
    weights: 2 steps + a resumed 3rd equal 3 uninterrupted steps."""
    qlora = ["--quantize", "nf4", "--compute-dtype", "bfloat16", "--optimizer", "adamw_torch"]
    reference = tmp_path / "one"
    assert cli.main(flags(tiny_model_dir, text_file, reference, 4, steps=2) + qlora) == 0
    env = {**cpu_env(), "FINECHAT_FSDP_CPU_SIM": "1", "FINECHAT_FSDP_CPU_SIM_MIXED_PRECISION": "bf16"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FSDP_CPU_SIM), env.get("PYTHONPATH")) if p)

    def launch(argv: list[str]) -> None:
        done = subprocess.run(distributed.launch_command(argv, 2), capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(flags(tiny_model_dir, text_file, straight, 2, steps=3) + qlora + ["--distributed", "fsdp"])
    launch(flags(tiny_model_dir, text_file, resumed, 2, steps=2, save_steps=2) + qlora + ["--distributed", "fsdp"])
    checkpoint = resumed / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file()  # the Trainer ran FSDP

    single = adapter_layout(reference / distributed.ADAPTER_WEIGHTS)
    assert {dtype for _, dtype in single.values()} == {"BF16"}
    for run_dir in (straight, resumed, checkpoint):
        assert adapter_layout(run_dir / distributed.ADAPTER_WEIGHTS) == single, run_dir
        assert adapter_config(run_dir) == adapter_config(reference), run_dir
    training = adapter_layout(checkpoint / distributed.ADAPTER_TRAINING_WEIGHTS)
    assert training.keys() == single.keys() and {dtype for _, dtype in training.values()} == {"F32"}

    launch(["train", "--output", str(resumed), "--resume", "--max-steps", "3"])
    assert adapter_layout(resumed / distributed.ADAPTER_WEIGHTS) == single
    assert sorted(losses(resumed)) == [1, 2, 3] and losses(resumed)[3] == pytest.approx(losses(straight)[3], abs=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(straight / distributed.ADAPTER_WEIGHTS), load_file(resumed / distributed.ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "requested, processes, weights, gpu, expected",
    [
        ("auto", 1, 40.0, 80.0, "single"),
        ("fsdp", 1, None, None, "single"),
        ("auto", 2, 3.9, 80.0, "ddp"),  # Mistral-7B in NF4 on an H100
        ("auto", 2, 37.0, 48.0, "fsdp"),  # a 70B in NF4 on 48 GB cards
        ("auto", 2, None, None, "ddp"),  # size unknown (a Hub id not yet downloaded)
        ("ddp", 2, 37.0, 48.0, "ddp"),
        ("fsdp", 2, 3.9, 80.0, "fsdp"),
    ],
)
def test_choose_mode(requested, processes, weights, gpu, expected, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.choose_mode(requested, processes, weights, gpu) == expected


def test_accelerate_fsdp_config_means_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.choose_mode("auto", 2, 3.9, 80.0) == "fsdp"
    with pytest.raises(UserError, match="accelerate launch was given an FSDP config"):
        distributed.choose_mode("ddp", 2, 3.9, 80.0)


def test_bad_mode_is_a_one_line_error(tiny_model_dir, text_file, tmp_path, capsys):
    code = cli.main(flags(tiny_model_dir, text_file, tmp_path / "r", 2) + ["--distributed", "zero3"])
    assert code == 2 and "--distributed must be one of auto, ddp, fsdp" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_parameter_count_from_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    n = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    assert distributed.count_parameters(tiny_model_dir) == n
    assert distributed.weights_gib(str(tiny_model_dir), "none", "float32") == pytest.approx(n * 4 / 2**30)
    assert distributed.weights_gib("org/not-downloaded", "nf4", "bfloat16") is None


def test_gpus_relaunch_keeps_every_flag_but_gpus(tmp_path):
    argv = ["-v", "train", "--gpus", "2", "--model", "m", "--lr", "1e-4", "--no-gradient-checkpointing"]
    argv += ["--lora-targets", "q_proj,v_proj", "--output", str(tmp_path / "r"), "--distributed", "fsdp"]
    args = cli.build_parser().parse_args(argv)
    again = distributed.train_argv(args)
    assert "--gpus" not in again and again[:2] == ["-v", "train"]
    reparsed = cli.build_parser().parse_args(again)
    for f in cfg.fields():
        assert getattr(reparsed, f.name) == getattr(args, f.name), f.name
    command = distributed.launch_command(again, 2)
    assert command[1:7] == ["-m", "finechat.launch", "--standalone", "--nproc_per_node", "2", "-m"]
    assert command[7:] == ["finechat", *again]


def test_gpus_replaces_the_process_by_torchrun(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """finechat train --gpus 2 becomes torchrun running the same command twice (the DDP test runs that command)."""
    launched = []

    def execv(path, argv):
        launched.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "execv", execv)
    argv = flags(tiny_model_dir, text_file, tmp_path / "r", 2) + ["--gpus", "2", "--no-fast-path"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    command = launched[0]
    assert command[:8] == distributed.launch_command([], 2)
    again, given = cli.build_parser().parse_args(command[8:]), cli.build_parser().parse_args(argv)
    assert again.gpus is None and all(getattr(again, f.name) == getattr(given, f.name) for f in cfg.fields())
    assert not (tmp_path / "r").exists()  # the run folder is the processes' to create

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert cli.main(argv) == 2 and len(launched) == 1  # an existing folder is refused before launching


def test_gpus_needs_that_many_cuda_devices(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = cli.main(flags(tiny_model_dir, text_file, tmp_path / "r", 2) + ["--gpus", "2"])
    assert code == 2 and "--gpus 2: this machine shows 1 CUDA GPU(s)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = cli.build_parser().parse_args(["train", "--gpus", "2"])
    with pytest.raises(UserError, match="launcher started 4 processes"):
        distributed.relaunch(args, tmp_path / "r")


def test_fsdp_settings_are_the_fsdp_qlora_recipe():
    """What TrainingArguments makes of them (FSDP itself needs CUDA; the GPU bench runs it)."""
    from trl import SFTConfig

    kwargs = distributed.trainer_kwargs(distributed.Plan("fsdp", 2, 0), on_gpu=True)
    args = SFTConfig(output_dir="unused", bf16=False, **kwargs)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["use_orig_params"] is False
    assert plugin["reshard_after_forward"] == "full_shard" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert distributed.gradient_checkpointing_kwargs(distributed.Plan("fsdp", 2, 0)) == {"use_reentrant": True}
    assert distributed.trainer_kwargs(distributed.Plan(), on_gpu=True) == {}
    assert distributed.trainer_kwargs(distributed.Plan("ddp", 2, 1), on_gpu=False)["use_cpu"] is True
    fsdp, ddp = distributed.Plan("fsdp", 2, 0), distributed.Plan("ddp", 2, 0)
    assert distributed.optimizer(fsdp, "paged_adamw_32bit") == "adamw_torch"
    assert distributed.optimizer(fsdp, "adamw_torch_fused") == "adamw_torch_fused"
    assert distributed.optimizer(ddp, "paged_adamw_32bit") == "paged_adamw_32bit"


def test_numa_binding_reads_linux_cpu_lists_and_leaves_one_process_alone():
    assert distributed.parse_cpu_list("0-3,8,10-11\n".strip()) == {0, 1, 2, 3, 8, 10, 11}
    assert distributed.parse_cpu_list("") == set()
    before = os.sched_getaffinity(0)
    assert distributed.bind_to_gpu(distributed.Plan()) == "one process: no binding"
    assert os.sched_getaffinity(0) == before
