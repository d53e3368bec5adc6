"""Loading tensor files safely: tensors only, never pickled code, one clear line for each failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.core.errors import KdpipeError


def load_tensors(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``, with one line for each way it fails: a file that holds
    pickled Python objects (code that would run on loading: refused, and never the advice to load it
    unsafely), or a file that is not a torch file at all (truncated, another format)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _unsafe_global(exc)
        if refused:
            raise KdpipeError(
                f"{path}: not a safe {what}: it holds pickled Python objects ({refused}), which could "
                "run code when loaded, and kdpipe loads tensors only; re-save its tensors as "
                ".safetensors (or a plain state dict) from a trusted copy"
            ) from None
        raise KdpipeError(f"{path}: not a readable {what} ({_unpickler_reason(exc)})") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise KdpipeError(f"{path}: not a readable {what} ({_first_line(exc)})") from None


def _unsafe_global(exc: Exception) -> str | None:
    """The Python object torch refused to rebuild (e.g. "GLOBAL exec"), from its long message; None
    when the refusal is about something else (a file that is not a pickle at all)."""
    import re

    found = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(exc))
    return found.group(1) if found else None


def _unpickler_reason(exc: Exception) -> str:
    """The one useful line of torch's refusal of a file that is not a torch file (e.g. "Unsupported
    operand 110" for a text file), without its advice to load the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("Unsupported")), None)
    return f"not a torch file: {detail}" if detail else "not a torch file"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
