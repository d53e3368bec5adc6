"""benchmarks/gpu_check.py (`make gpu-check`): one line and {"gpu": false} without a GPU; its checks,
run on the CPU (--dry-run-on-cpu), exercise the same code the GPU run does."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answer: only where there is no GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gpu-check: no CUDA GPU here")
    written = json.loads((tmp_path / "check.json").read_text())
    assert written["gpu"] is False and written["torch"] == torch.__version__


@pytest.mark.slow
def test_every_check_runs_on_the_cpu(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = gpu_check.main(["--out", str(tmp_path / "dry"), "--dry-run-on-cpu"])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / "dry.json").read_text())
    assert code == 0, written["failed"]
    assert set(written["checks"]) == {
        "amp_bf16",
        "amp_fp16",
        "masked_augmentation",
        "pipeline",
        "ddp_nccl",
        "resume_across_devices",
    }
    assert written["checks"]["pipeline"]["augment_teacher_inference"] == "onnxruntime"
    assert set(gpu_check.RECIPES) <= set(written["checks"]["pipeline"])
    legs = written["checks"]["resume_across_devices"]["legs"]
    assert [leg["resumed_at"] for leg in legs] == [0, 3, 6]
