"""Background training jobs: one `python -m mrcnn train` subprocess at a time per server.

The job lives on disk, not in a Streamlit session, so it survives page reruns and browser reloads
and every session sees the same job:

    RUNS/current_job.json     which run is (or was last) active: run dir, pid, command, start time, owner
    RUN_DIR/train.log         the subprocess's stdout + stderr (the reason when it crashes)
    RUN_DIR/metrics.jsonl     written by the trainer, one JSON object per logged step
    RUN_DIR/status.json       written by the trainer at the end: finished | cancelled | failed
    RUN_DIR/STOP              cancel flag the trainer polls (it saves a checkpoint, then exits)

    job = start_job(["--model", "shapes", "--data", "shapes:200", "--steps", "100"], run_dir)
    job.state()   # "running", "finished", "cancelled", "failed"
    job.cancel()

``owner`` is a secret the starting session chose (``start_job(..., owner=token)``): the session that holds it
may treat the run as its own (cancel it without asking), also after a reload. Records written before it
existed have none.

A registry that cannot be read (not UTF-8, not JSON, a pid that is not a process id of ours) counts as
"no job": ``current_job()`` returns None and ``registry_problem()`` says why, for the page to show.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mrcnn.errors import MrcnnError
from mrcnn.files import atomic_write_bytes
from mrcnn.model.zoo import REPO_ROOT, runs_dir
from mrcnn.training.config import LOSS_TERMS
from mrcnn.training.run_files import is_number, read_metrics, write_status

# the numbers of a metrics row (engine's _MetricLogger.row) that the page shows
ROW_NUMBERS = ("step", "loss", "lr", "images_per_s", "elapsed", "eta_s", *LOSS_TERMS)

REGISTRY = "current_job.json"
START_LOCK = ".start.lock"
LOCK_STALE_S = 30.0  # a start lock older than this was left by a crashed server


class JobError(MrcnnError):
    """A job that cannot be started (another one runs, bad settings)."""


@dataclass
class Job:
    run_dir: str
    pid: int
    command: list[str]
    started: float
    steps: int
    owner: str = ""  # the starting session's secret; "" for none

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def is_alive(self) -> bool:
        return _pid_alive(self.pid) and _same_command(self.pid, self.command)

    def status(self) -> dict:
        """The trainer's own final status, or what we can tell from outside."""
        written = _read_status(self.path / "status.json")
        if written is not None:
            return written
        if self.is_alive():
            return {"state": "running", "message": ""}
        if not self.path.is_dir():
            return {"state": "failed", "message": f"the run folder {self.path.name} was deleted"}
        return {"state": "failed", "message": _crash_reason(self.path / "train.log")}

    def state(self) -> str:
        return self.status()["state"]

    def metrics(self) -> list[dict]:
        """Every complete line of metrics.jsonl so far (a half-written last line is skipped), and of those only
        the rows whose numbers are numbers: the page formats them (a hand-edited "loss": "abc" or null was a
        traceback on the Fine-tune page)."""
        return [row for row in read_metrics(self.path / "metrics.jsonl")
                if all(is_number(row[key]) for key in ROW_NUMBERS if key in row)
                and (row.get("gpu_mem_mb") is None or is_number(row["gpu_mem_mb"]))]

    def progress(self) -> dict:
        """step, steps, fraction, elapsed and ETA in seconds (from the measured step rate)."""
        rows = [r for r in self.metrics() if isinstance(r.get("step"), int)]
        step = max((int(r["step"]) for r in rows), default=0)
        elapsed = time.time() - self.started
        eta = None
        if step > 0 and self.state() == "running":
            eta = elapsed / step * max(self.steps - step, 0)
        return {"step": step, "steps": self.steps, "fraction": min(step / max(self.steps, 1), 1.0),
                "elapsed_s": elapsed, "eta_s": eta}

    def log_tail(self, lines: int = 20) -> str:
        path = self.path / "train.log"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def cancel(self, grace_s: float = 60.0) -> None:
        """Ask the trainer to stop (flag file + SIGTERM); it saves a checkpoint before it exits.
        After ``grace_s`` without exiting it is killed. A trainer that ended without a status of its own
        (SIGTERM came before it could catch it, during its imports) is recorded as cancelled."""
        with contextlib.suppress(FileNotFoundError):  # the run folder was deleted: signal all the same
            (self.path / "STOP").touch()
        if not self.is_alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline and self.is_alive():
            time.sleep(0.1)
        message = "cancelled before the trainer could save anything"
        if self.is_alive():
            os.kill(self.pid, signal.SIGKILL)
            message = "killed after it did not stop within the grace period"
        if self.path.is_dir() and _read_status(self.path / "status.json") is None:
            write_status(self.path, "cancelled", message)

    def to_dict(self) -> dict:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    if pid < 2:  # 0 and -1 would address process groups, 1 is init: never ours
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as finished: reap it if it is ours
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _same_command(pid: int, command: list[str]) -> bool:
    """Guards against a recycled pid (e.g. after a reboot) passing for our trainer: the process must
    run exactly the command the job started."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")[:-1]  # each argument ends with a NUL
    except OSError:
        return True  # no /proc: trust the pid
    if not args:  # a process in the middle of exec() has no arguments yet: trust the pid
        return True
    return [a.decode(errors="replace") for a in args] == command


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_status(path: Path) -> dict | None:
    """status.json as the trainer wrote it ({"state", "message"}), None when missing or unreadable."""
    try:
        status = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
        return None
    if not (isinstance(status, dict) and isinstance(status.get("state"), str)):
        return None
    return {"state": status["state"], "message": str(status.get("message", ""))}


def _crash_reason(log: Path) -> str:
    """The last meaningful line of the log of a process that ended without a status."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"the training process ended unexpectedly (killed or crashed): {last[:300]}"


def current_job(root: Path | None = None) -> Job | None:
    """The job recorded for this server (running or ended), or None (also when the registry cannot be
    read: registry_problem() says why)."""
    return _read_registry(root)[0]


def registry_problem(root: Path | None = None) -> str | None:
    """Why the job registry was ignored (one line for the page), or None when it is fine or absent."""
    return _read_registry(root)[1]


def _read_registry(root: Path | None) -> tuple[Job | None, str | None]:
    path = (root or runs_dir()) / REGISTRY
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: not UTF-8, not JSON
        return None, f"{REGISTRY} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is ignored"
    problem = _registry_record_problem(record)
    if problem:
        return None, f"{REGISTRY} is not a valid job record ({problem}); it is ignored"
    return Job(**record), None


def _registry_record_problem(record) -> str | None:
    """What is wrong with a parsed registry record, or None. The pid is signalled by cancel(): only a
    real process id (>= 2) passes, never 0 or -1 (process groups) or 1 (init)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    expected = {f.name for f in fields(Job)}
    optional = {"owner"}  # records written before there were owners lack it
    if not expected - optional <= set(record) <= expected:
        return f"expected exactly the fields {', '.join(sorted(expected - optional))} (and owner, optional)"
    pid = record["pid"]
    if not (type(pid) is int and pid >= 2):
        return f"pid must be a process id (an integer >= 2), got {pid!r}"
    command = record["command"]
    if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
        return "command must be a list of strings"
    if not isinstance(record["run_dir"], str):
        return "run_dir must be a string"
    if not (type(record["steps"]) is int and type(record["started"]) in (int, float)):
        return "steps and started must be numbers"
    if not isinstance(record.get("owner", ""), str):
        return "owner must be a string"
    return None


def running_job(root: Path | None = None) -> Job | None:
    job = current_job(root)
    return job if job is not None and job.state() == "running" else None


def train_command(nproc: int = 1) -> list[str]:
    """`python -m mrcnn train`, or with ``nproc`` > 1 the same under torchrun, one process per GPU (DDP).
    torchrun is run as `python -m torch.distributed.run`: the process's command line is then exactly this
    list, which is how a job recognises its process (_same_command)."""
    if nproc < 1:
        raise JobError(f"the number of training processes must be at least 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m", "mrcnn", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "mrcnn", "train"]


def start_job(train_args: list[str], run_dir: str | Path, steps: int, root: Path | None = None,
              trainer: list[str] | None = None, nproc: int = 1, owner: str = "") -> Job:
    """Start `python -m mrcnn train <train_args> --out run_dir` in the background, under torchrun with
    ``nproc`` processes when > 1 (``trainer`` replaces the train command, for tests). ``owner``, the starting
    session's secret, is recorded with the job: written here, with the job, it cannot be lost between the two.

    Refused with JobError while another job runs. Creating the registry entry is guarded by an
    exclusive lock file so that two sessions clicking at once cannot both start a job."""
    root = root or runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / START_LOCK
    fd = _take_start_lock(lock)
    try:
        other = running_job(root)
        if other is not None:
            raise JobError(f"a training run is already in progress ({Path(other.run_dir).name}); "
                           "wait for it or cancel it first")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("STOP", "status.json"):
            (run_dir / stale).unlink(missing_ok=True)
        command = [*(trainer or train_command(nproc)), *train_args, "--out", str(run_dir)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(run_dir / "train.log", "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                                    start_new_session=True)  # not killed with the Streamlit script run
        job = Job(str(run_dir), proc.pid, command, time.time(), int(steps), owner)
        try:
            atomic_write_bytes(root / REGISTRY, json.dumps(job.to_dict()).encode())
        except OSError as err:  # a job no page could find, watch or cancel: it does not run
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun's workers go with it
            proc.wait()
            raise JobError(f"the run cannot be recorded in {root / REGISTRY}: {err.strerror or err}") from err
        return job
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)


def _take_start_lock(lock: Path) -> int:
    """The file descriptor of the exclusively created ``lock``; JobError while another start holds it."""
    for _ in range(3):
        try:
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # released between the create and the stat: try again
        if age < LOCK_STALE_S:
            break
        lock.unlink(missing_ok=True)  # stale lock from a crashed server
    raise JobError("another training run is being started right now")
