"""Counting the host reads (GPU synchronisations) a piece of torch code makes, on the CPU."""

from __future__ import annotations

from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts the operations that read tensor data back to the host. On a GPU each one waits for
    every queued kernel to finish (a host synchronisation); counting them on the CPU shows how many
    a call would make there. Data-dependent ops are counted as the host reads they make on CUDA
    (``bincount`` reads its input's min and max, ``nonzero`` its output size, boolean indexing is a
    ``nonzero``); ``.tolist()`` and ``.numpy()`` do not dispatch on a CPU tensor, so the caller wraps them."""

    SYNCING = {
        "_local_scalar_dense",
        "nonzero",
        "bincount",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "repeat_interleave",
        "equal",
        "is_nonzero",
    }

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (
            name == "index"
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(fn) -> int:
    """Host reads ``fn()`` makes (see :class:`HostReads`)."""
    mode = HostReads()

    def counted(original):
        def wrapped(self, *a, **kw):
            mode.count += 1
            return original(self, *a, **kw)

        return wrapped

    with (
        mock.patch.object(torch.Tensor, "tolist", counted(torch.Tensor.tolist)),
        mock.patch.object(torch.Tensor, "numpy", counted(torch.Tensor.numpy)),
        mode,
    ):
        fn()
    return mode.count
