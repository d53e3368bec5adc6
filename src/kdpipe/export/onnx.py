"""ONNX export and onnxruntime sessions: the pieces select, export, evaluate and predict share.

Contract of every exported graph: one input ``images`` (float32 NCHW RGB in ``[0, 1]``, dynamic
batch) and one output ``logits`` ``(batch, num_classes)``; normalisation is inside the graph (see
:mod:`kdpipe.training.models`), so callers only decode, resize and divide by 255.

Execution providers are asserted, never assumed: ``onnxruntime-gpu`` asked for
``CUDAExecutionProvider`` on a machine without a usable GPU only logs an error and runs on the CPU,
so :func:`make_session` compares what was asked with what the session really uses.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kdpipe.core.errors import KdpipeError
from kdpipe.training.metrics import accuracy  # noqa: F401  (re-exported for the steps)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
FP32_NAME = "model.onnx"  # the exported model files (what evaluate, register and predict read)
INT8_NAME = "model.int8.onnx"
CPU = "CPUExecutionProvider"


# ---------------------------------------------------------------- export and checks


@contextlib.contextmanager
def _quiet_legacy_export() -> Iterator[None]:
    """Silence the legacy exporter's deprecation and tracer warnings.

    The TorchScript exporter (``dynamo=False``) is deprecated but exports our small CNNs in ~0.5 s
    against ~15 s for the dynamo one, with the same numerics; its warnings would only alarm users.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export_onnx(model, path: str | os.PathLike, image_size: int, opset: int) -> Path:
    """Export ``model`` (eval mode, on the CPU) to ``path`` with a dynamic batch; check the result."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inner = getattr(model, "module", model)  # unwrap DDP / torch.compile like checkpoints do
    inner = getattr(inner, "_orig_mod", inner).cpu().eval()
    dummy = torch.rand(1, 3, int(image_size), int(image_size))
    with _quiet_legacy_export(), torch.no_grad():
        torch.onnx.export(
            inner,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=int(opset),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    check_onnx(path)
    return path


def check_onnx(path: str | os.PathLike) -> None:
    """``onnx.checker`` on a file; a malformed model becomes a :class:`KdpipeError` naming it."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"{path}: ONNX model not found")
    try:
        # The path form (not a loaded proto) also handles models with external data.
        onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, protobuf DecodeError, ...
        raise KdpipeError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- sessions


def make_session(
    path: str | os.PathLike,
    providers: Sequence[str] = (CPU,),
    allow_cpu_fallback: bool = False,
    threads: int = 0,
):
    """An ``onnxruntime.InferenceSession`` on exactly ``providers`` (checked before and after).

    A requested provider missing from this onnxruntime build, or silently dropped by the session,
    is a :class:`KdpipeError` unless ``allow_cpu_fallback``, which warns and runs on the CPU.
    """
    import onnxruntime as ort

    check_onnx(path)
    requested = list(providers) or [CPU]
    usable = _available(requested, ort.get_available_providers(), allow_cpu_fallback)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: provider fallbacks are reported by us, below
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
        raise KdpipeError(
            f"{path}: onnxruntime cannot load the model ({type(exc).__name__}: {exc})"
        ) from None
    # Only what the session was given: providers missing from the build were reported above.
    _check_active(path, usable, session.get_providers(), allow_cpu_fallback)
    return session


def _available(requested: list[str], available: list[str], allow_cpu_fallback: bool) -> list[str]:
    missing = [p for p in requested if p not in available]
    if not missing:
        return requested
    message = (
        f"execution provider(s) {missing} not available in this onnxruntime build (available: {available})"
    )
    if not allow_cpu_fallback:
        raise KdpipeError(message + "; install the matching onnxruntime package or set allow_cpu_fallback")
    warnings.warn(message + "; falling back to CPUExecutionProvider", RuntimeWarning, stacklevel=3)
    kept = [p for p in requested if p in available]
    return kept + ([CPU] if CPU not in kept else [])


def _check_active(path, requested: list[str], active: list[str], allow_cpu_fallback: bool) -> None:
    dropped = [p for p in requested if p not in active]
    if not dropped:
        return
    message = f"{path}: onnxruntime dropped execution provider(s) {dropped}; the session runs on {active}"
    if not allow_cpu_fallback:
        raise KdpipeError(
            message + " (a GPU provider that cannot start falls back silently; set "
            "allow_cpu_fallback to accept that)"
        )
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def input_name(session) -> str:
    return session.get_inputs()[0].name


# ---------------------------------------------------------------- inference


def to_model_input(images_uint8_nhwc: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [0, 1]: the only preprocessing the graphs need."""
    x = np.asarray(images_uint8_nhwc)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise KdpipeError(f"expected images shaped (N, H, W, 3), got {x.shape}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def run_logits(session, images_uint8_nhwc: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits ``(N, C)`` for uint8 NHWC images, run ``batch`` images at a time."""
    name = input_name(session)
    outputs = []
    for start in range(0, len(images_uint8_nhwc), max(1, int(batch))):
        chunk = to_model_input(images_uint8_nhwc[start : start + batch])
        outputs.append(session.run(None, {name: chunk})[0])
    if not outputs:
        classes = session.get_outputs()[0].shape[-1]
        return np.zeros((0, classes if isinstance(classes, int) else 0), dtype=np.float32)
    return np.concatenate(outputs).astype(np.float32, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- timing


def _random_input(image_size: int, batch: int) -> np.ndarray:
    # Fixed seed: timings do not depend on data for CNNs, but runs stay comparable anyway.
    rng = np.random.default_rng(0)
    return rng.random((int(batch), 3, int(image_size), int(image_size)), dtype=np.float32)


def latency_ms(session, image_size: int, runs: int, batch: int = 1, warmup: int | None = None) -> dict:
    """Per-call latency in ms: ``{"p50", "p95", "mean", "runs", "batch"}``, after warm-up calls.

    Warm-up matters: the first calls allocate memory arenas and pick kernels.
    """
    feed = {input_name(session): _random_input(image_size, batch)}
    for _ in range(warmup if warmup is not None else min(10, max(2, runs // 5))):
        session.run(None, feed)
    times = []
    for _ in range(max(1, int(runs))):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(times)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
        "runs": len(times),
        "batch": int(batch),
    }


def throughput(session, image_size: int, batch: int, runs: int) -> float:
    """Images per second at ``batch`` (one warm-up call, then ``runs`` timed calls)."""
    feed = {input_name(session): _random_input(image_size, batch)}
    session.run(None, feed)
    runs = max(1, int(runs))
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    elapsed = time.perf_counter() - start
    return float(batch * runs / elapsed) if elapsed > 0 else float("inf")


def torch_logits(model, images_uint8_nhwc: np.ndarray, batch: int = 256) -> np.ndarray:
    """The torch reference for :func:`run_logits`: same input conversion, CPU, eval mode, fp32."""
    import torch

    model = model.cpu().eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images_uint8_nhwc), max(1, int(batch))):
            x = torch.from_numpy(to_model_input(images_uint8_nhwc[start : start + batch]))
            outputs.append(model(x).float().numpy())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outputs)
