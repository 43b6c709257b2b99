"""The launcher behind `finechat train --gpus N`: torchrun (torch.distributed.run) starts the N processes, and this
module reports how they ended the way finechat reports everything, in one line and an exit code.

- Ctrl-C: every process finishes its step, saves a checkpoint and says so; the launcher adds nothing and exits 130.
- A process that refused its input (exit 2) already printed the one-line error: exit 2, nothing added.
- A process that crashed or was killed: one line naming the rank and how it ended (its own traceback, if any, is
  above), exit 1.

torchrun's own log lines and its traceback on a signal stay out of the user's terminal. Unless OMP_NUM_THREADS is
set, each process gets its share of the CPU cores (torchrun would give each one thread). Started by hand,
`python -m finechat.launch --standalone --nproc_per_node 2 -m finechat train ...` takes torchrun's arguments.
"""

from __future__ import annotations

import logging
import os
import sys

INTERRUPTED = 130
# How long the processes get to finish their step and save after a Ctrl-C before torchrun kills them (torchrun's
# default is 30 s; a step with gradient accumulation on long sequences can take longer).
SHUTDOWN_TIMEOUT_S = "120"


def _quiet_torchrun() -> None:
    """torchrun's modules log through loggers that each set their own level; raise those levels past ERROR."""
    for name in list(logging.root.manager.loggerDict):
        if name == "torch.distributed.run" or name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_torchrun()
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        # torchrun would give each process one CPU thread; the processes share the machine's cores instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(args.nproc_per_node)))
    try:
        torchrun.run(args)
    except SignalException as e:
        return 128 + int(e.sigval)  # the processes stopped after their step and reported it
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (2, INTERRUPTED):
            return failure.exitcode
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
        print(f"finechat: process {rank} of the run {how}; its output above says why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
