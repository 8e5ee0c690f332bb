"""The Slurm launcher under a real Slurm: munged, slurmctld and slurmd on this host (start_slurm.sh).

The tiny CPU model trains through ``examples/slurm/train.sbatch``, the script users submit, with the
container switched off (``V2PE_USE_CONTAINER=0``) on one node, one task:

- a job runs to the end (COMPLETED, exit 0:0), logs its steps and leaves a checkpoint;
- a second job with more steps resumes from that checkpoint;
- ``scancel --signal=USR1`` on a running job: the step finishes, a checkpoint is saved, exit 0;
- ``scancel --signal=TERM`` (every process of the step gets it: the trainer, its data-loader worker and
  its async checkpoint writer): the same;
- ``scancel --batch --signal=USR1`` (what ``#SBATCH --signal=B:USR1@600`` sends before the time limit):
  the same, and the job is requeued.

Skipped only where Slurm cannot run: not root, or Slurm missing and no apt-get to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_SLURM = REPO / "tests" / "slurm" / "start_slurm.sh"
STATE_DIR = Path("/tmp/v2pe-slurm")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def _daemons_running() -> bool:
    for name in ("slurmctld", "slurmd"):
        pidfile = STATE_DIR / f"{name}.pid"
        try:
            os.kill(int(pidfile.read_text()), 0)
        except (OSError, ValueError):
            return False
    return True


@pytest.fixture(scope="module")
def slurm_env():
    """The environment that talks to the local Slurm; its daemons stop afterwards if started here."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (munged, slurmctld and slurmd are started by the test)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install Debian's slurm-wlm")
    was_running = _daemons_running()
    started = subprocess.run(["bash", str(START_SLURM), str(STATE_DIR)], capture_output=True, text=True,
                             timeout=240)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, f"start_slurm.sh failed:\n{started.stdout}\n{started.stderr}"
    env = {**os.environ, "SLURM_CONF": str(STATE_DIR / "slurm.conf"), "V2PE_USE_CONTAINER": "0",
           "V2PE_PYTHON": sys.executable}
    env.pop("V2PE_CONTAINER_IMAGE", None)
    jobs: list[str] = []
    yield env, jobs
    for job in jobs:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    if not was_running:
        subprocess.run(["bash", str(START_SLURM), "--stop", str(STATE_DIR)], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Synthetic shards and a tokenizer, as overrides for examples/configs/tiny_cpu.yaml."""
    from megatron_v2pe.training.demo import synthesise

    manifests, tokenizer = synthesise(tmp_path_factory.mktemp("slurm_data"), samples=8, context_tokens=(256,))
    return [f"data.datasets=[{{shards: '{manifests[0]}'}}]", f"data.tokenizer={tokenizer}",
            "data.num_workers=0", "logging.log_interval=1", "logging.progress_bar=false"]


class Job:
    def __init__(self, slurm_env, log_dir: Path, name: str, overrides: list[str]):
        env, jobs = slurm_env
        self.env = env
        cpus = min(len(os.sched_getaffinity(0)), 2)
        # --time well above the 10-minute warning of train.sbatch's --signal=B:USR1@600, which Slurm
        # would otherwise send at once.
        submitted = subprocess.run(
            ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=1", f"--cpus-per-task={cpus}",
             "--time=30", f"--output={log_dir}/%x-%j.out", "examples/slurm/train.sbatch",
             "examples/configs/tiny_cpu.yaml", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )
        assert submitted.returncode == 0, submitted.stderr
        self.id = submitted.stdout.strip().split(";")[0]
        jobs.append(self.id)
        self.log = log_dir / f"{name}-{self.id}.out"

    def info(self) -> dict[str, str]:
        shown = subprocess.run(["scontrol", "--oneliner", "show", "job", self.id], env=self.env,
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, what: str, condition, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: no {what} after {timeout:.0f} s; state {self.info().get('JobState')}, "
                            f"log:\n{self.text()[-4000:]}")
            time.sleep(1)

    def wait_finished(self, timeout: float = 150) -> dict[str, str]:
        self.wait_for("end", lambda: self.info().get("JobState") in FINISHED, timeout)
        return self.info()

    def send(self, *scancel_args: str) -> None:
        subprocess.run(["scancel", *scancel_args, self.id], env=self.env, check=True, timeout=30)


def latest(checkpoints: Path) -> int:
    return int((checkpoints / "latest_checkpointed_iteration.txt").read_text())


def steps(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"^iter\s+(\d+)/\d+ \|", log, flags=re.M)]


def assert_clean_exit(info: dict[str, str], job: Job) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.text()[-4000:]


def test_train_then_resume(slurm_env, data, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = Job(slurm_env, tmp_path, "v2pe-first", [*data, "training.train_iters=4",
                                                     "checkpoint.save_interval=2", f"checkpoint.save={checkpoints}"])
    assert_clean_exit(first.wait_finished(), first)
    log = first.text()
    assert steps(log) == [1, 2, 3, 4], log[-4000:]
    assert "v2pe: bare metal" in log and "v2pe: step exited with status 0" in log
    assert latest(checkpoints) == 4 and (checkpoints / "iter_0000004").is_dir()

    second = Job(slurm_env, tmp_path, "v2pe-resume", [*data, "training.train_iters=6",
                                                       f"checkpoint.save={checkpoints}"])
    assert_clean_exit(second.wait_finished(), second)
    log = second.text()
    assert f"resumed from {checkpoints / 'iter_0000004'}" in log, log[-4000:]
    assert steps(log) == [5, 6], log[-4000:]
    assert latest(checkpoints) == 6


def test_usr1_saves_and_exits_cleanly(slurm_env, data, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    job = Job(slurm_env, tmp_path, "v2pe-usr1", [*data, "training.train_iters=100000", "checkpoint.save_interval=null",
                                                  f"checkpoint.save={checkpoints}"])
    job.wait_for("training step", lambda: steps(job.text()))
    job.send("--signal=USR1")
    assert_clean_exit(job.wait_finished(), job)
    stopped = re.search(r"stopping after iteration (\d+) on signal 10; checkpoint (\d+) saved", job.text())
    assert stopped and stopped[1] == stopped[2], job.text()[-4000:]
    assert latest(checkpoints) == int(stopped[1]) == steps(job.text())[-1]
    assert "requeueing" not in job.text()


def test_term_to_every_process_of_the_step_saves_and_exits_cleanly(slurm_env, data, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    job = Job(slurm_env, tmp_path, "v2pe-term", [*data, "data.num_workers=1", "checkpoint.async_save=true",
                                                  "training.train_iters=100000", "checkpoint.save_interval=1",
                                                  f"checkpoint.save={checkpoints}"])
    job.wait_for("two training steps", lambda: len(steps(job.text())) >= 2)
    job.send("--signal=TERM")  # no --batch: slurmstepd signals all processes of the step
    assert_clean_exit(job.wait_finished(), job)
    stopped = re.search(r"stopping after iteration (\d+) on signal 15; checkpoint (\d+) saved", job.text())
    assert stopped and stopped[1] == stopped[2], job.text()[-4000:]
    assert latest(checkpoints) == int(stopped[1]) == steps(job.text())[-1]
    assert "Traceback" not in job.text() and not list(checkpoints.glob("*.tmp"))


def test_time_limit_signal_saves_and_requeues(slurm_env, data, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    job = Job(slurm_env, tmp_path, "v2pe-requeue", [*data, "training.train_iters=100000",
                                                     "checkpoint.save_interval=null", f"checkpoint.save={checkpoints}"])
    job.wait_for("training step", lambda: steps(job.text()))
    job.send("--batch", "--signal=USR1")  # what --signal=B:USR1@600 delivers before the time limit
    job.wait_for("requeue", lambda: int(job.info().get("Restarts", 0)) >= 1)
    log = job.text()
    stopped = re.search(r"stopping after iteration (\d+) on signal 10; checkpoint (\d+) saved", log)
    assert stopped and stopped[1] == stopped[2], log[-4000:]
    assert "v2pe: step exited with status 0" in log and f"requeueing job {job.id}" in log
    assert latest(checkpoints) == int(stopped[1])
