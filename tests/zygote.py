"""A pre-imported process that forks one child per ``kdpipe`` command (used by the crash-safety and
secret tests; pytest puts tests/ on sys.path).

Importing torch, onnxruntime and mlflow takes seconds on a small machine; a forked child of a process
that already imported them starts in milliseconds, runs ``kdpipe.cli.main(argv)`` exactly as the
console script does, in its own process (own state, own stdout/stderr, killable with SIGKILL), and
exits. Options per command: ``step_sleep`` (slow each training step down and print ``ITER n``),
``kill_at_replace`` ([k, "before"|"after"]: SIGKILL itself around its k-th ``os.replace``),
``kill_at_iteration`` ([k, "step"|"replace"]: SIGKILL itself right after its k-th training step, or
at its first ``os.replace`` after it: a checkpoint being renamed into place) and ``log_level``
(configure ``logging`` to stderr at that level). The kills happen at points the child reaches, never
after a wall-clock delay, so a loaded machine changes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

KILLED = -signal.SIGKILL

SCRIPT = r"""
import json, logging, os, signal, sys, time, traceback

import numpy, PIL.Image, torch, torch.onnx, onnx, onnxruntime  # noqa: F401 - imported once, shared by forks
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use: 2+ s otherwise
from onnxruntime.quantization import quantize_static  # noqa: F401
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: F401

import kdpipe.cli
from kdpipe.training.engine import Trainer
from kdpipe.steps import augment, distill, evaluate, export, prepare, select, teacher  # noqa: F401
for extra in sys.argv[1:]:  # optional modules (mlflow, or a step that not every checkout has)
    try:
        __import__(extra)
    except ImportError:
        pass


def child(job):
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(job["cwd"])
    if job.get("log_level"):
        logging.basicConfig(level=job["log_level"], stream=sys.stderr)
    stop_at, stop_how = job.get("kill_at_iteration") or (None, None)
    if job.get("step_sleep") is not None or stop_at is not None:
        step = Trainer.step
        reached = [0]

        def reporting_step(self, batch=None, _sleep=job.get("step_sleep") or 0.0):  # results unchanged
            time.sleep(_sleep)
            parts = step(self, batch)
            reached[0] = self.iteration + 1
            print(f"ITER {reached[0]}", flush=True)  # iterations completed so far
            if reached[0] == stop_at and stop_how == "step":
                os.kill(os.getpid(), signal.SIGKILL)
            return parts

        Trainer.step = reporting_step
        if stop_how == "replace":
            real_replace = os.replace

            def replace_after(src, dst, *args, **kwargs):
                if reached[0] >= stop_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                real_replace(src, dst, *args, **kwargs)

            os.replace = replace_after
    if job.get("kill_at_replace"):
        k, when = job["kill_at_replace"]
        real, calls = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            calls[0] += 1
            if calls[0] == k and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *args, **kwargs)
            if calls[0] == k and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replace
    return kdpipe.cli.main(job["argv"])


for line in sys.stdin:
    job = json.loads(line)
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
    print(json.dumps({"pid": pid}), flush=True)
    status = None
    if job.get("kill_after") is not None:
        # Killed from here, before it is reaped: the pid cannot have been reused by then.
        deadline = started + job["kill_after"]
        while status is None:
            done, result = os.waitpid(pid, os.WNOHANG)
            if done:
                status = result
            elif time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                break
            else:
                time.sleep(0.002)
    if status is None:
        _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - started}), flush=True)
"""


class Zygote:
    """``run(argv, cwd)`` / ``run_killed(argv, cwd, delay)`` a kdpipe command in a forked child.

    ``env`` is the whole environment of the children (default: this one with step tracking off).
    """

    def __init__(self, folder: Path, extra_modules: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.folder = Path(folder)
        script = self.folder / "zygote.py"
        script.write_text(SCRIPT, encoding="utf-8")
        env = {**os.environ, "KDPIPE_TRACKING": "0"} if env is None else env
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *extra_modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
            cwd=self.folder,
        )
        self.count = 0

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the zygote died (exit {self.proc.poll()})"
        return json.loads(line)

    def start(self, argv: list, cwd: Path, log: Path | None = None, **options) -> tuple[int, Path]:
        self.count += 1
        log = Path(log) if log else self.folder / f"child-{self.count}.log"
        log.write_bytes(b"")  # exists even if the child is killed before it opens it
        job = {"argv": [str(a) for a in argv], "cwd": str(cwd), "log": str(log), **options}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply()["pid"], log

    def finish(self) -> tuple[int, float]:
        reply = self._reply()
        return reply["code"], reply["seconds"]

    def run(self, argv: list, cwd: Path, **options) -> tuple[int, float, str]:
        """(exit code, seconds, stdout+stderr) of one command run to its end."""
        _, log = self.start(argv, cwd, **options)
        code, seconds = self.finish()
        return code, seconds, log.read_text(errors="replace")

    def run_killed(self, argv: list, cwd: Path, delay: float, **options) -> tuple[int, str]:
        """Start a command and SIGKILL it after ``delay`` s; (exit code, output). The code is 0 if
        the command finished first."""
        _, log = self.start(argv, cwd, kill_after=delay, **options)
        code, _ = self.finish()
        return code, log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
