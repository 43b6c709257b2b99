"""finechat.launch: torchrun's launcher, reporting how the processes ended in one line and an exit code."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="plain CPU processes")


def launch(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text("import os, signal, sys\nrank = int(os.environ['RANK'])\n" + body)
    command = [sys.executable, "-m", "finechat.launch", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_processes_that_finish_exit_0_quietly_with_their_share_of_the_cores(tmp_path):
    body = f"open(os.path.join({str(tmp_path)!r}, f'rank{{rank}}'), 'w').write(os.environ['OMP_NUM_THREADS'])\n"
    done = launch(tmp_path, body)  # a file per process: their prints would share one pipe
    assert done.returncode == 0, done.stderr
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [share, share]
    assert "Traceback" not in done.stderr and "OMP_NUM_THREADS" not in done.stderr  # no torchrun banner


def test_a_crashed_or_killed_process_is_one_line_naming_its_rank(tmp_path):
    done = launch(tmp_path, "sys.exit(3 if rank == 1 else 0)\n")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "finechat: process 1 of the run exited with 3; its output above says why"
    )
    killed = launch(tmp_path, "if rank == 0:\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert killed.returncode == 1 and "process 0 of the run was killed by SIGKILL" in killed.stderr
    assert "Traceback" not in done.stderr + killed.stderr and "ChildFailedError" not in done.stderr + killed.stderr
