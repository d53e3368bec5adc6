"""Where training runs: device choice, mixed precision, memory layout and DDP set-up.

CPU is the default here. On CUDA, training uses autocast (bf16 where the GPU supports it, fp16 with
a GradScaler otherwise), channels_last, pinned memory and non-blocking copies. bf16 autocast is
never chosen on CPU by default: on CPUs without native bf16 it is 7-50x slower than fp32.
Multi-GPU runs are launched by ``torchrun``; :func:`init_distributed` reads its environment.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.core.errors import KdpipeError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full fp32
    channels_last: bool  # the policy, per model: see wants_channels_last
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, writes checkpoints and talks to the tracking server."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    cpu_channels_last_auto: bool = False  # "auto" on a CPU: channels_last for models without grouped convs

    def wants_channels_last(self, model) -> bool:
        """Whether ``model`` runs in channels_last memory format here.

        On CUDA (and with ``channels_last: on``) always. With ``auto`` on a CPU only for networks
        without grouped (depthwise) convolutions: measured here, channels_last makes a plain 3x3 CNN
        1.4x faster (cnn_tiny, forward + backward, batch 128) but depthwise nets slower
        (mobilenet_v3_small 507 -> 381 images/s)."""
        if self.channels_last:
            return True
        if not self.cpu_channels_last_auto:
            return False
        from torch import nn

        return not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; for bf16/fp32 the scaler is a transparent no-op.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device; from pinned memory (a :meth:`host_buffer`) the copy is
        asynchronous and needs no staging copy (``pin_memory`` returns a pinned tensor as it is)."""
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        """An uninitialised host tensor to assemble a batch in: pinned when the device is a GPU.
        Freeing it right after an asynchronous copy is safe: torch's pinned-memory cache reuses a
        block only once the copies that read it have completed. Elsewhere the memory comes from
        numpy: allocated in the prefetch thread, torch's CPU allocator handed out fresh pages for
        every batch (measured at 224 px: batches assembled 25% slower than into numpy's)."""
        if self.device.type == "cuda":
            return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        return torch.from_numpy(np.empty(shape, dtype))


EXPECT_GPU_ENV = "KDPIPE_EXPECT_GPU"  # set by the Kubeflow pipeline on the tasks it gives a GPU


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if os.environ.get(EXPECT_GPU_ENV) == "1" and not torch.cuda.is_available():
        # A task that holds a GPU and trains on the CPU would run for days and look healthy.
        raise KdpipeError(
            f"this task was given a GPU ({EXPECT_GPU_ENV}=1) but CUDA is unusable: torch {torch.__version__} is built "
            f"for CUDA {torch.version.cuda or 'none (a CPU-only build)'}; check the node's NVIDIA driver against that "
            "CUDA version and the image's torch build (README, 'Cluster prerequisites')"
        )
    if name == "cuda":
        if not torch.cuda.is_available():
            raise KdpipeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    if name == "off":
        return None
    if name == "auto":
        if device.type != "cuda":
            return None  # fp32 on CPU: bf16 autocast is far slower on most CPUs
        return torch.bfloat16 if native_cuda_bf16() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise KdpipeError("train.amp 'fp16' needs a CUDA device")
    return torch.bfloat16 if name == "bf16" else torch.float16


def native_cuda_bf16() -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere and later).

    ``torch.cuda.is_bf16_supported()`` also answers True where bf16 is only emulated (T4, V100),
    which is several times slower than fp16 there; "auto" must then pick fp16 with a GradScaler."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def init_distributed(device: torch.device) -> tuple[int, int, int]:
    """Join the process group that torchrun describes in the environment; (rank, world, local)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, local_rank


def make_runtime(
    device: str = "auto", amp: str = "auto", channels_last: str = "auto", threads: int = 0
) -> Runtime:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    rank, world_size, local_rank = init_distributed(dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    # channels_last speeds up convolutions on CUDA and on CPU for plain 3x3 CNNs (measured:
    # ResNet-20 215 -> 291 img/s here), but slows depthwise nets on CPU, so "auto" on a CPU decides
    # per model (Runtime.wants_channels_last).
    use_cl = channels_last == "on" or (channels_last == "auto" and dev.type == "cuda")
    cpu_auto = channels_last == "auto" and dev.type == "cpu"
    return Runtime(dev, resolve_amp(amp, dev), use_cl, rank, world_size, local_rank, cpu_auto)


def runtime_from_params(train_params) -> Runtime:
    return make_runtime(
        train_params.device, train_params.amp, train_params.channels_last, train_params.threads
    )
