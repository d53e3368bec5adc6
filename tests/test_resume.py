"""Kill-and-resume: a distill run killed with SIGKILL and re-run ends bit-for-bit where an
uninterrupted run ends; a resume state written with other settings is not used."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdpipe.core.atomic import read_json
from kdpipe.core.errors import KdpipeError
from kdpipe.training import checkpoints

pytestmark = pytest.mark.slow

# "full" exercises everything a resume must restore: both networks and optimizers, the LR
# schedules, both samplers, the augmentation generator, the adaptive schedule and the history.
RESUME_TRAIN = {
    "recipe": "full",
    "max_iterations": 30,
    "epoch_iterations": 5,
    "eval_every": 5,
    "checkpoint_every": 3,
    "threads": 1,
}
KILL_AT = 9  # iteration of the last.pt to wait for before killing (mid-epoch: running losses are saved too)

CHILD = """
import json, sys, time
from kdpipe.training.engine import Trainer
from kdpipe.core.params import validate_params
from kdpipe.steps import distill

cfg = json.loads(open(sys.argv[1], encoding="utf-8").read())
step = Trainer.step

def slow_step(self, batch=None):  # slows the loop down so the parent can kill it mid-run; no effect on results
    time.sleep(cfg["sleep"])
    return step(self, batch)

Trainer.step = slow_step
distill.run(validate_params(cfg["params"]), **cfg["paths"])
"""


def _paths(d, out):
    return {
        "prepared_dir": str(d["prepared"]),
        "augmented_dir": str(d["augmented"]),
        "teacher_dir": str(d["teacher"]),
        "out_dir": str(out),
    }


def _last_iteration(path) -> int:
    try:
        return int(checkpoints.load(path)["iteration"])
    except KdpipeError:  # not written yet
        return -1


def _start_child(tmp_path, d, params, out, sleep):
    cfg = tmp_path / "child.json"
    cfg.write_text(
        json.dumps({"params": params.model_dump(mode="json"), "paths": _paths(d, out), "sleep": sleep})
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc, log


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _without_timing(history):
    return [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


def test_killed_run_resumes_bit_for_bit(tiny_pipeline_dirs, tiny_params_factory, run_distill, tmp_path):
    d = tiny_pipeline_dirs
    params = tiny_params_factory(**RESUME_TRAIN)
    killed = tmp_path / "killed"
    last = killed / "last.pt"

    proc, log = _start_child(tmp_path, d, params, killed, sleep=0.1)
    try:
        deadline = time.monotonic() + 60
        while _last_iteration(last) < KILL_AT:
            assert proc.poll() is None, "the child ended before it could be killed:\n" + (
                tmp_path / "child.log"
            ).read_text(errors="replace")
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()

    interrupted_at = _last_iteration(last)
    assert KILL_AT <= interrupted_at < RESUME_TRAIN["max_iterations"]
    assert not (killed / "metrics.json").exists()  # the run really did not finish

    summary = run_distill(killed, **RESUME_TRAIN)  # re-run: resumes from last.pt
    assert summary["iterations"] == RESUME_TRAIN["max_iterations"]
    reference = tmp_path / "reference"
    run_distill(reference, **RESUME_TRAIN)  # same settings and seed, never interrupted

    a, b = checkpoints.load(killed / "last.pt"), checkpoints.load(reference / "last.pt")
    assert a["iteration"] == b["iteration"] == RESUME_TRAIN["max_iterations"]
    _assert_same_state(a["student"], b["student"], "last.pt student")
    _assert_same_state(a["teacher"], b["teacher"], "last.pt teacher")
    assert a["sampler"] == b["sampler"] and a["schedule"] == b["schedule"]
    assert _without_timing(a["history"]) == _without_timing(b["history"])
    for name in ("student.pt", "teacher.pt"):
        ca, cb = checkpoints.load(killed / name), checkpoints.load(reference / name)
        _assert_same_state(ca["state_dict"], cb["state_dict"], name)
        assert ca["meta"] == cb["meta"]
    assert _without_timing(read_json(killed / "history.json")) == _without_timing(
        read_json(reference / "history.json")
    )
    assert read_json(killed / "schedule.json") == read_json(reference / "schedule.json")


def test_resume_after_completion_does_not_train_again(run_distill, tmp_path, capsys):
    out = tmp_path / "out"
    run_distill(out, recipe="supervised", max_iterations=10)
    before = checkpoints.load(out / "last.pt")
    capsys.readouterr()
    # threads is not part of the fingerprint: it does not change the trajectory's settings
    summary = run_distill(out, recipe="supervised", max_iterations=10, threads=2)
    assert "resuming from" in capsys.readouterr().out
    assert summary["iterations"] == 10
    after = checkpoints.load(out / "last.pt")
    _assert_same_state(before["student"], after["student"], "student")
    assert before["history"] == after["history"]


def test_resume_with_changed_settings_starts_over(run_distill, tmp_path, capsys):
    out = tmp_path / "out"
    run_distill(out, recipe="supervised", max_iterations=10, lr=0.05)
    first = checkpoints.load(out / "last.pt")
    capsys.readouterr()

    summary = run_distill(out, recipe="supervised", max_iterations=10, lr=0.02)
    printed = capsys.readouterr().out
    assert "starting over" in printed and "resuming from" not in printed
    assert summary["iterations"] == 10
    again = checkpoints.load(out / "last.pt")
    assert again["fingerprint"]["train"]["lr"] == 0.02
    assert any(not torch.equal(first["student"][k], again["student"][k]) for k in first["student"])

    # it trained from scratch: exactly what a fresh run with the new settings gives
    fresh = tmp_path / "fresh"
    run_distill(fresh, recipe="supervised", max_iterations=10, lr=0.02)
    _assert_same_state(again["student"], checkpoints.load(fresh / "last.pt")["student"], "student")
    assert _without_timing(again["history"]) == _without_timing(
        checkpoints.load(fresh / "last.pt")["history"]
    )


# ------------------------------------------------------------------------ another precision, another device
CPU = torch.device("cpu")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _trainer(d, params, out, amp: str, channels_last: bool = False, device: torch.device = CPU):
    """The distill trainer with the runtime given directly: fp16 autocast and its GradScaler run on
    the CPU exactly as on a GPU (the params only allow fp16 on CUDA, where it pays)."""
    from kdpipe.steps.distill import build_trainer
    from kdpipe.training.devices import Runtime

    runtime = Runtime(device, PRECISIONS[amp], channels_last)
    return build_trainer(
        params, d["prepared"], d["augmented"], d["teacher"], out, runtime=runtime, progress=False
    )


@pytest.mark.parametrize(("saved", "resumed"), [("fp32", "fp16"), ("fp16", "fp32"), ("fp16", "bf16")])
def test_a_run_resumes_under_another_precision(
    saved, resumed, tiny_pipeline_dirs, tiny_params_factory, tmp_path
):
    """A preempted GPU run rescheduled onto another machine resumes, whatever its precision there (an
    fp32 resume state used to stop an fp16 run with the GradScaler's RuntimeError)."""
    d = tiny_pipeline_dirs
    params = tiny_params_factory(
        recipe="full", max_iterations=6, eval_every=3, epoch_iterations=3, checkpoint_every=3
    )
    out = tmp_path / "out"
    first = _trainer(d, params, out, saved)
    first.run()
    again = _trainer(d, params, out, resumed)
    assert again.try_resume() and again.iteration == 6
    parts = again.step()  # one more step in the new precision: autocast and (for fp16) loss scaling
    assert all(torch.isfinite(v) for v in parts.values())
    assert again.scaler.is_enabled() == (resumed == "fp16")


DEVICES = [
    CPU,
    pytest.param(
        torch.device("cuda"),
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.mark.parametrize("device", DEVICES, ids=["cpu", "cuda"])
def test_fp16_autocast_with_loss_scaling_and_channels_last_trains(
    device, tiny_pipeline_dirs, tiny_params_factory, tmp_path
):
    """The GPU training path (autocast fp16, GradScaler, channels_last) run end to end: on the CPU
    here, and on the GPU where there is one."""
    d = tiny_pipeline_dirs
    params = tiny_params_factory(recipe="full", max_iterations=6, eval_every=3, epoch_iterations=3)
    trainer = _trainer(d, params, tmp_path / "out", "fp16", channels_last=True, device=device)
    assert trainer.nets.student_cl and trainer.scaler.is_enabled()
    kernels = [p for p in trainer.student.parameters() if p.dim() == 4]
    assert kernels and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)
    summary = trainer.run()
    assert summary["iterations"] == 6
    losses = [h["loss_total"] for h in trainer.history if "loss_total" in h]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert trainer.scaler.get_scale() > 0


def test_a_state_saved_on_another_kind_of_device_resumes(
    tiny_pipeline_dirs, tiny_params_factory, tmp_path, capsys
):
    """A run preempted on a GPU and resumed on a CPU (or the reverse): the augmentation generator's
    state cannot cross devices (a CUDA generator's is 16 bytes, a CPU one's 5056), so the stream
    restarts from the seed with a note, and the rest resumes as saved. (Restoring it as it was failed.)"""
    d = tiny_pipeline_dirs
    params = tiny_params_factory(
        recipe="full", max_iterations=6, eval_every=3, epoch_iterations=3, checkpoint_every=3
    )
    out = tmp_path / "out"
    _trainer(d, params, out, "fp32").run()
    state = checkpoints.load(out / "last.pt")
    state["rng"][0].update(
        gen=torch.zeros(16, dtype=torch.uint8), gen_device="cuda"
    )  # as a CUDA run writes it
    checkpoints.save(state, out / "last.pt")
    again = _trainer(d, params, out, "fp32")
    assert again.try_resume() and again.iteration == 6
    assert "written on cuda, this run is on cpu: the augmentation stream restarts" in capsys.readouterr().out
    parts = again.step()
    assert all(torch.isfinite(v) for v in parts.values())
    # the restart is deterministic: a second resume draws the same augmentations
    third = _trainer(d, params, out, "fp32")
    assert third.try_resume()
    assert torch.equal(third.gen.get_state(), _trainer_after_resume(d, params, out).gen.get_state())


def _trainer_after_resume(d, params, out):
    trainer = _trainer(d, params, out, "fp32")
    trainer.try_resume()
    return trainer
