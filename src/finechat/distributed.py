"""Multi-GPU training through PyTorch distributed: `finechat train --gpus N` re-runs itself under torchrun, each
process joins the process group the launcher set up, picks DDP or FSDP, and takes part in the few collective steps
the run folder needs. For one process every function here is a no-op, so train() reads the same either way.

Works the same under `torchrun -m finechat train ...` and `accelerate launch -m finechat train ...`: the launcher's
environment (WORLD_SIZE, RANK, LOCAL_RANK) is all that is read."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from finechat.config import DISTRIBUTED_CHOICES as MODES
from finechat.errors import UserError

log = logging.getLogger(__name__)

# auto shards (FSDP) when the base weights alone would fill more than this share of one GPU: the rest is needed for
# activations, the LM-head logits and the optimizer.
FSDP_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    """How this process takes part in a run: mode single, ddp or fsdp; its rank among world_size processes."""

    mode: str = "single"
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        """True for the process that writes the run folder, logs and draws the progress bar."""
        return self.rank == 0


def world_size() -> int:
    """Processes in this run, as the launcher (torchrun, accelerate launch) set WORLD_SIZE; 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a launched run; valid before the process group exists."""
    return rank() == 0


def accelerate_fsdp() -> bool:
    """True when `accelerate launch` was given an FSDP config (it says so through ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def choose_mode(requested: str, processes: int, weights_gib: float | None, gpu_gib: float | None) -> str:
    """single for one process; else the requested mode, where auto is FSDP when accelerate was configured for it or
    the base weights would take more than FSDP_SHARE of one GPU, and DDP otherwise."""
    if requested not in MODES:
        raise UserError(f"--distributed must be one of {', '.join(MODES)}, got {requested!r}")
    if processes <= 1:
        return "single"
    if requested == "ddp" and accelerate_fsdp():
        raise UserError(
            "--distributed ddp, but accelerate launch was given an FSDP config; "
            "pass --distributed fsdp (or auto), or launch with a non-FSDP accelerate config"
        )
    if requested != "auto":
        return requested
    if accelerate_fsdp():
        return "fsdp"
    if weights_gib is not None and gpu_gib and weights_gib > FSDP_SHARE * gpu_gib:
        return "fsdp"
    return "ddp"


def count_parameters(folder: Path) -> int | None:
    """Parameters in a model folder's safetensors files, read from their headers (no weights are loaded); None
    when the folder has none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def weights_gib(model_path: str, quantize: str, compute_dtype: str) -> float | None:
    """Approximate size of the loaded base weights (4 bits a weight for nf4), or None when they cannot be counted."""
    params = count_parameters(Path(model_path)) if Path(model_path).is_dir() else None
    if params is None:
        return None
    bytes_per_param = 0.5 if quantize == "nf4" else (4 if compute_dtype == "float32" else 2)
    return params * bytes_per_param / 2**30


def join() -> Plan:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on CPU); Plan() for one process. The mode is
    decided by choose() once the model is known."""
    if world_size() <= 1:
        return Plan()
    import torch
    from accelerate import PartialState

    # The Trainer builds the same PartialState later; joining now lets rank 0 write the run folder while the others
    # wait. On CPU, accelerate runs processes over gloo only when asked for the CPU.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=1800))  # Trainer's default
    plan = Plan("ddp", state.num_processes, state.process_index)
    if not plan.is_main:
        logging.getLogger("finechat").setLevel(logging.WARNING)  # rank 0 speaks for the run
    return plan


def gpu_cpus(gpu: int) -> set[int] | None:
    """The CPUs next to CUDA device `gpu` (its NUMA node's, from the PCI device's local_cpulist), or None where
    the system does not say."""
    import torch

    props = torch.cuda.get_device_properties(gpu)
    ids: list[int] = [getattr(props, f"pci_{part}_id", -1) for part in ("domain", "bus", "device")]
    if min(ids) < 0:  # a torch whose device properties lack the PCI address
        return None
    address = "{:04x}:{:02x}:{:02x}.0".format(*ids)
    try:
        text = Path(f"/sys/bus/pci/devices/{address}/local_cpulist").read_text().strip()
    except OSError:
        return None
    return parse_cpu_list(text) or None


def parse_cpu_list(text: str) -> set[int]:
    """Linux's CPU list format, e.g. "0-15,32-47" -> {0, ..., 15, 32, ..., 47}."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def bind_to_gpu(plan: Plan) -> str:
    """With several processes on CUDA: pin every thread of this process to the CPUs of its GPU's NUMA node (memory
    it touches first is then allocated there, pinned host buffers included). Returns what it did, for the log."""
    import torch

    if plan.world_size <= 1 or not torch.cuda.is_available():
        return "one process: no binding"
    gpu = int(os.environ.get("LOCAL_RANK", "0"))
    near, allowed = binding_cpus(gpu), os.sched_getaffinity(0)
    if near is None:
        return f"GPU {gpu}: its NUMA node's CPUs are unknown or all of this process's ({len(allowed)}): no binding"
    for task in Path("/proc/self/task").iterdir():  # every thread started so far; later ones inherit the mask
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task.name), near)
    return f"GPU {gpu}: bound to the {len(near)} CPUs of its NUMA node (of {len(allowed)})"


def binding_cpus(gpu: int) -> set[int] | None:
    """The CPUs bind_to_gpu pins a process of CUDA device `gpu` to: those of its NUMA node that this process may
    use, or None where that would change nothing (the node holds every one of them) or the node is unknown."""
    allowed = os.sched_getaffinity(0)
    near = (gpu_cpus(gpu) or set()) & allowed
    return near if near and near != allowed else None


def choose(plan: Plan, requested: str, model_path: str, quantize: str, compute_dtype: str) -> Plan:
    """The plan with its mode (DDP or FSDP) decided for this model; unchanged for one process."""
    if plan.world_size <= 1:
        return plan
    import torch

    cuda = torch.cuda.is_available()
    gpu_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if cuda else None
    mode = choose_mode(requested, plan.world_size, weights_gib(model_path, quantize, compute_dtype), gpu_gib)
    if mode == "fsdp" and not cuda:
        raise UserError("--distributed fsdp needs CUDA GPUs; on CPU (gloo) use --distributed ddp")
    log.info("distributed: %s over %d processes (%s)", mode.upper(), plan.world_size, "NCCL" if cuda else "gloo")
    return replace(plan, mode=mode)


@contextlib.contextmanager
def main_first(plan: Plan) -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (a GGUF is converted once, a download made once)."""
    if not plan.is_main:
        barrier(plan)
    try:
        yield
    finally:
        if plan.is_main:
            barrier(plan)  # also when rank 0 failed: the others then meet the same error instead of waiting


def barrier(plan: Plan) -> None:
    """Wait until every process gets here."""
    if plan.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def from_main(plan: Plan, value: Any) -> Any:
    """Rank 0's value on every process (so all ranks act on the same checkpoint, say)."""
    if plan.world_size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_process(flag: bool) -> bool:
    """True on every process when flag is True on at least one (a collective: all processes must call it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return flag
    # On the host, over gloo: callbacks.InterruptCallback asks after every step, and the NCCL all-reduce plus .item()
    # it used to do waited for the GPU to finish the step, so the host could never queue the next one ahead.
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t.item())


_host_group: tuple[Any, Any] | None = None  # (default group, a gloo group over the same processes)


def host_group() -> Any:
    """The process group of all processes to reduce host (CPU) tensors over: None (the default group) when that runs
    gloo, else a gloo group made on the first call. All processes must make that first call at the same point."""
    import torch.distributed as dist

    global _host_group
    if "gloo" in str(dist.get_backend()):
        return None
    world = dist.group.WORLD
    if _host_group is None or _host_group[0] is not world:  # none yet, or made for a process group since destroyed
        _host_group = (world, dist.new_group(backend="gloo"))
    return _host_group[1]


# How DistributedDataParallel wraps a LoRA model (finechat's fast path included):
# - find_unused_parameters=False: every adapter weight gets exactly one gradient each step, so DDP need not walk the
#   autograd graph after each forward. That also makes checkpointing that recomputes inside backward (HF's, and
#   finechat.offload's) safe: a parameter's gradient hook fires once, in the recompute, and DDP reduces its bucket then.
# - broadcast_buffers=False: the only buffers (rotary frequencies) are equal on every process and never change;
#   broadcasting them before every forward is a collective per micro-batch for nothing.
# - gradient_as_bucket_view=True: gradients live in DDP's communication buckets, so no copy between the two after
#   the all-reduce, and one gradient-sized buffer less.
# - static_graph stays off: it is for graphs with unused or reused parameters, and a LoRA step has neither (not
#   measured).
# - bucket_cap_mb=256, one bucket for a 7B model's adapter: Mistral-7B's r=16 adapter has 42M bf16 gradients
#   (80 MiB), which the default 25 MB made five all-reduces launched during backward. Each NCCL kernel waits on
#   its SMs for the other process to reach the same bucket, beside the backward kernels; on 2xH200 a DDP step took
#   0.448 s (median) against 0.384 on one GPU (round 6, docs/benchmarks.md). With one bucket (round 7) the NCCL time
#   fell from 109 to 25 ms a step, but the median DDP step stayed 0.44-0.46 s: the rest of the gap is elsewhere.
DDP_OPTIONS: dict[str, Any] = {
    "find_unused_parameters": False,
    "broadcast_buffers": False,
    "gradient_as_bucket_view": True,
    "bucket_cap_mb": 256,
}


def trainer_kwargs(plan: Plan, on_gpu: bool) -> dict[str, Any]:
    """TrainingArguments (SFTConfig) settings for the plan: DDP as DDP_OPTIONS says (with ddp_options()), or FSDP the
    way the FSDP-QLoRA recipe does."""
    if plan.mode == "single":
        return {}
    kwargs: dict[str, Any] = {
        "ddp_find_unused_parameters": DDP_OPTIONS["find_unused_parameters"],
        "ddp_broadcast_buffers": DDP_OPTIONS["broadcast_buffers"],
    }
    if not on_gpu:
        kwargs["use_cpu"] = True  # makes accelerate run the processes over gloo
    if plan.mode == "fsdp":
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = {
            # FSDP1 with flat parameters: FSDP2 drops the quant_state of bitsandbytes' Params4bit when it shards
            # (bitsandbytes#1945), FSDP1 keeps it on the module (bitsandbytes#970).
            "version": 1,
            "reshard_after_forward": "full_shard",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the Trainer adds peft's policy: LoRA layers apart
            "backward_prefetch": "BACKWARD_PRE",
            "forward_prefetch": False,
            "use_orig_params": False,
            "sync_module_states": True,
            "cpu_ram_efficient_loading": False,  # every process loads the (4-bit) base onto its own GPU
            "state_dict_type": "FULL_STATE_DICT",  # checkpoints hold a plain peft adapter, as on one GPU
        }
    return kwargs


def ddp_options(trainer, plan: Plan) -> None:
    """Give the trainer's DDP wrapper the DDP_OPTIONS that TrainingArguments has no field for (call before train())."""
    handler = trainer.accelerator.ddp_handler
    if plan.mode == "ddp" and handler is not None:  # accelerate builds DistributedDataParallel from it in prepare
        handler.gradient_as_bucket_view = DDP_OPTIONS["gradient_as_bucket_view"]
        handler.bucket_cap_mb = DDP_OPTIONS["bucket_cap_mb"]


def optimizer(plan: Plan, name: str) -> str:
    """The optimizer to use: as configured, except that FSDP gets torch's AdamW in place of a bitsandbytes one."""
    if plan.mode == "fsdp" and any(tag in name for tag in ("paged", "8bit", "bnb", "32bit")):
        # Paged states live in host-mapped memory that FSDP cannot gather into a checkpoint, and 8-bit states do
        # not gather at all (accelerate#1362); a LoRA's optimizer state is small enough not to need either.
        log.info("FSDP: optimizer adamw_torch instead of %s", name)
        return "adamw_torch"
    return name


def gradient_checkpointing_kwargs(plan: Plan) -> dict[str, Any]:
    """Reentrant checkpointing under FSDP, as the FSDP-QLoRA recipe uses; non-reentrant otherwise."""
    return {"use_reentrant": plan.mode == "fsdp"}


def save_adapter(trainer, run_dir: Path, plan: Plan) -> None:
    """Write the trained adapter to run_dir exactly as a single-process run does (rank 0 writes; under FSDP every
    process first helps gather the full weights)."""
    if plan.mode != "fsdp":
        if plan.is_main:
            trainer.model.save_pretrained(run_dir, safe_serialization=True)
        return
    from finechat.callbacks import FSDPAdapter

    layout = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FSDPAdapter)).layout
    state_dict = gather_full_state_dict(trainer.model)
    if plan.is_main:
        # peft writes adapter_config.json and the model card; the weights are written again below (see FSDPAdapter).
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(run_dir, state_dict=state_dict)
        write_adapter_weights(run_dir / ADAPTER_WEIGHTS, state_dict, layout)


ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Under FSDP with mixed precision, accelerate keeps the LoRA weights in float32 (it upcasts every trainable flat
# parameter), while a single-process QLoRA run trains and saves them in bfloat16 (TRL casts them). A checkpoint then
# holds the adapter in the single-process format and, beside it, the float32 weights training goes on from.
ADAPTER_TRAINING_WEIGHTS = "adapter_training_weights.safetensors"


@dataclass(frozen=True)
class AdapterLayout:
    """A peft adapter file's tensors: for each key, the parameter's name in the model and the dtype a single-process
    run saves it in."""

    names: dict[str, str]
    dtypes: dict[str, Any]


def adapter_layout(model, adapter_name: str = "default") -> AdapterLayout:
    """The layout of the trainable (adapter) parameters, read from the peft model before FSDP flattens (and
    accelerate upcasts) them."""
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    keys = [name.replace(f".{adapter_name}.", ".") for name, _ in trainable]
    return AdapterLayout(
        names={key: name for key, (name, _) in zip(keys, trainable, strict=True)},
        dtypes={key: param.dtype for key, (_, param) in zip(keys, trainable, strict=True)},
    )


def gather_full_state_dict(model) -> dict[str, Any]:
    """The full state dict of an FSDP model on rank 0, in host memory ({} on the other ranks; all must call it)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(
        model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    ):
        return model.state_dict()


def write_adapter_weights(path: Path, state_dict: dict[str, Any], layout: AdapterLayout, as_saved: bool = True) -> bool:
    """Write the adapter tensors of a full model state dict as peft names them, in the dtypes a single-process run
    saves (as_saved=False: as they are). True when some tensor was narrowed on the way."""
    from safetensors.torch import save_file

    missing = [name for name in layout.names.values() if name not in state_dict]
    if missing:
        raise RuntimeError(f"adapter weights missing from the gathered state dict: {missing[:3]}")
    tensors = {key: state_dict[name] for key, name in layout.names.items()}
    narrowed = any(t.dtype != layout.dtypes[key] for key, t in tensors.items())
    if as_saved:
        tensors = {key: t.to(layout.dtypes[key]) for key, t in tensors.items()}
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(path), metadata={"format": "pt"})
    return narrowed


def save_checkpoint_adapter(folder: Path, state_dict: dict[str, Any], layout: AdapterLayout) -> None:
    """Write a checkpoint's adapter as a single-process run does, plus the training weights where those are wider."""
    if write_adapter_weights(folder / ADAPTER_WEIGHTS, state_dict, layout):
        write_adapter_weights(folder / ADAPTER_TRAINING_WEIGHTS, state_dict, layout, as_saved=False)


def load_adapter_weights(model, folder: Path, layout: AdapterLayout) -> None:
    """Load a checkpoint's adapter into an FSDP model, from its training weights where it has them (every process
    reads the small file and takes part)."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    path = folder / ADAPTER_TRAINING_WEIGHTS
    path = path if path.is_file() else folder / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    unknown = sorted(set(tensors) - set(layout.names))
    if unknown or not tensors:
        raise UserError(f"--resume: {path} does not hold this run's adapter (unexpected: {unknown[:3]})")
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        result = model.load_state_dict({layout.names[k]: v for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"FSDP did not take adapter weights {result.unexpected_keys[:3]}")


# Process groups that finish() left, held until the process exits (see finish()).
_left_groups: list[Any] = []


def finish(plan: Plan) -> None:
    """Leave the process group once every process is done with the run folder."""
    if plan.world_size > 1:
        import torch.distributed as dist
        from accelerate.state import AcceleratorState

        dist.barrier()
        # DDP's Reducer holds the group too: once destroyed here, the group would die with the trainer when train()
        # returns, in the Reducer's destructor. That one keeps the GIL while ProcessGroupGloo's destructor joins gloo's
        # worker thread, which may still need the GIL to free the barrier's tensor: both wait for ever (seen in 1 of
        # ~120 Ctrl-C'd 2-process CPU runs: one process stuck after the run ended, until torchrun killed it 120 s
        # later). Dropped at exit through its Python object instead, whose destructor lets go of the GIL first.
        if not _left_groups:
            atexit.register(_left_groups.clear)
        _left_groups.append(dist.group.WORLD)
        dist.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)


def launch_command(finechat_args: list[str], processes: int) -> list[str]:
    """The command line that runs `finechat <finechat_args>` in `processes` processes on this machine: torchrun,
    through finechat.launch, which keeps torchrun's own logs and tracebacks out of the terminal."""
    return [
        sys.executable,
        "-m",
        "finechat.launch",
        "--standalone",  # a free local port: several runs may share a machine
        "--nproc_per_node",
        str(processes),
        "-m",
        "finechat",
        *finechat_args,
    ]


def train_argv(args: argparse.Namespace) -> list[str]:
    """The `finechat train` arguments that reproduce a parsed command line, without --gpus."""
    from finechat import config as cfg

    argv = ["-v"] if getattr(args, "verbose", False) else []
    argv.append("train")
    if args.config:
        argv += ["--config", args.config]
    argv += ["--resume"] if args.resume else []
    argv += ["--overwrite"] if args.overwrite else []
    for f in cfg.fields():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        flag = cfg.flag_for(f.name)
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def relaunch(args: argparse.Namespace, run_dir: Path) -> None:
    """For `finechat train --gpus N` (N > 1) outside a launcher: replace this process by torchrun running N copies
    of the same command. Returns when this process should train itself (one GPU, or already launched)."""
    gpus = args.gpus
    if gpus is None:
        return
    if gpus < 1:
        raise UserError(f"--gpus must be a positive number, got {gpus}")
    if world_size() > 1:
        if gpus != world_size():
            raise UserError(f"--gpus {gpus}, but the launcher started {world_size()} processes; drop --gpus")
        return
    if gpus == 1:
        return
    import torch

    found = torch.cuda.device_count()
    if found < gpus:
        raise UserError(
            f"--gpus {gpus}: this machine shows {found} CUDA GPU(s) (CUDA_VISIBLE_DEVICES limits them); "
            "lower --gpus, or on CPU run torchrun --nproc_per_node N -m finechat train ... for a gloo test run"
        )
    from finechat import runs

    runs.check_output(run_dir, resume=args.resume, overwrite=args.overwrite)  # refuse before starting N processes
    command = launch_command(train_argv(args), gpus)
    log.info("launching %d processes: %s", gpus, " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
