"""Device and precision policy, and the mixed-precision code paths run for real on the CPU.

The GPU-only decisions (which autocast dtype a given GPU gets) are checked against torch's own
answer for that GPU; the code that then runs (autocast, GradScaler, channels_last) is the same on
CPU and CUDA in torch, so it is exercised here on the CPU and, where CUDA exists, on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from kdpipe.core.errors import KdpipeError
from kdpipe.training.devices import Runtime, resolve_amp
from kdpipe.training.models import build_model

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pretend_gpu(monkeypatch, native_bf16: bool) -> None:
    """torch's answer for a GPU: bf16 is "supported" everywhere when emulation counts (T4, V100),
    natively only from Ampere on."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native_bf16 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_amp_picks_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    pretend_gpu(monkeypatch, native_bf16=False)  # a T4 or V100
    assert resolve_amp("auto", CUDA) is torch.float16


def test_auto_amp_picks_bf16_on_a_gpu_with_native_bf16(monkeypatch):
    pretend_gpu(monkeypatch, native_bf16=True)  # an A100, H100, L4...
    assert resolve_amp("auto", CUDA) is torch.bfloat16


def test_amp_on_the_cpu_is_off_by_default_and_fp16_needs_cuda():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(KdpipeError, match="fp16"):
        resolve_amp("fp16", cpu)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_models_in_the_low_precision_dtype(dtype):
    runtime = Runtime(torch.device("cpu"), dtype, channels_last=True)
    model = build_model("cnn_tiny", 3, 16).to(memory_format=torch.channels_last)
    with runtime.autocast():
        logits = model(torch.rand(4, 3, 16, 16).to(memory_format=torch.channels_last))
    assert logits.dtype == dtype


def test_grad_scaler_is_on_for_fp16_only_and_scales_the_loss():
    cpu = torch.device("cpu")
    assert not Runtime(cpu, None, False).grad_scaler().is_enabled()
    assert not Runtime(cpu, torch.bfloat16, False).grad_scaler().is_enabled()
    scaler = Runtime(cpu, torch.float16, False).grad_scaler()
    assert scaler.is_enabled()
    loss = torch.tensor(2.0, requires_grad=True)
    assert float(scaler.scale(loss).detach()) == 2.0 * scaler.get_scale()


@needs_cuda
def test_auto_amp_on_this_gpu_matches_its_hardware():
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    assert resolve_amp("auto", CUDA) is expected
