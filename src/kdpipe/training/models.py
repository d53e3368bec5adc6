"""Model zoo: every network kdpipe trains, distils or exports.

Every model takes float32 NCHW RGB in ``[0, 1]`` and returns logits ``(N, num_classes)``; the
normalisation is its first layer, so callers only decode, resize and divide by 255.
:class:`Classifier` = ``normalize`` -> ``backbone`` -> ``head``; :meth:`Classifier.features` gives the
pooled features. :func:`build_model` builds torchvision architectures (stem adapted when
``image_size <= SMALL_INPUT_MAX``) and any timm name (prefix ``timm/`` to prefer timm);
``input_size=R`` makes a network resize its input to ``R x R`` first (a teacher that sees more pixels).

Design notes: docs/training-internals.md.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.core.errors import KdpipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Inputs up to this size (pixels, square side) get the small-input stem described above.
SMALL_INPUT_MAX = 64
# Below this the deepest tiny nets would pool a feature map down to nothing.
MIN_IMAGE_SIZE = 8


# --------------------------------------------------------------------------------------------
# The wrapper every builder returns
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are buffers so they travel in state_dict and ONNX."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ResizeInput(nn.Module):
    """Bilinear resize of an NCHW batch to ``size x size``; identity when it already has that size.

    The size check is on Python ints, so an ONNX export traced at one input size holds a fixed
    Resize (or nothing) -- the exported graph keeps the input size it was traced with."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == self.size and x.shape[-1] == self.size:
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Classifier(nn.Module):
    """``resize`` (optional) -> ``normalize`` -> ``backbone`` (pooled features) -> ``head`` (logits)."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        feature_dim: int,
        *,
        arch: str = "",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: int | None = None,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.feature_dim = int(feature_dim)
        self.arch = arch
        self.input_size = None if input_size is None else int(input_size)
        # Not a child module when unused, so the children (and state_dict) of plain models are unchanged.
        self._resize = ResizeInput(input_size) if input_size else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector ``(N, feature_dim)`` for an input in ``[0, 1]``."""
        if self._resize is not None:
            x = self._resize(x)
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor, with_features: bool = False):
        # ``with_features`` goes through forward() (not a second method) so that a DDP-wrapped
        # model still synchronises gradients: DDP only hooks the wrapper's forward call.
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if with_features else logits

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` in one pass, for feature distillation without a second forward."""
        return self.forward(x, with_features=True)


# --------------------------------------------------------------------------------------------
# Tiny hand-written models (fast tests, CPU demos, default students)
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _pool_flatten() -> list[nn.Module]:
    # Global pooling makes every net independent of the input size.
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]


def _init_weights(module: nn.Module) -> None:
    """He init for convs, unit BN: the usual recipe so freshly built tiny nets train from step one."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _vgg_backbone(widths: Sequence[int]) -> tuple[nn.Module, int]:
    """Stages of two 3x3 conv-BN-ReLU; 2x2 max-pool between stages (not after the last: the global
    pool follows), so a 8x8 input still leaves a 2x2 map for the last stage."""
    layers: list[nn.Module] = []
    c_in = 3
    for i, width in enumerate(widths):
        layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width)
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    backbone = nn.Sequential(*layers, *_pool_flatten())
    _init_weights(backbone)
    return backbone, c_in


def _cifar_resnet_backbone(blocks_per_stage: int, width: int = 16) -> tuple[nn.Module, int]:
    """CIFAR ResNet (He et al. 2016, sec. 4.2): 3x3 stem, three stages of BasicBlocks at widths
    w/2w/4w with stride 1/2/2. Depth = 6 * blocks_per_stage + 2 (1 -> ResNet-8, 3 -> ResNet-20).
    Downsampling shortcuts are 1x1 conv + BN ("option B"): simpler to export than zero padding."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = _conv_bn_relu(3, width)
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks_per_stage):
            stride = 2 if stage > 0 and b == 0 else 1
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
                )
            layers.append(BasicBlock(c_in, c_out, stride=stride, downsample=down))
            c_in = c_out
    backbone = nn.Sequential(*layers, *_pool_flatten())
    _init_weights(backbone)
    return backbone, c_in


# Plain 3x3 VGG-style students at three widths: on a CPU they learn the most per second of training
# (depthwise convolutions and residual blocks do less per FLOP there; BASELINES in BENCHMARKS.md).
_TINY: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "cnn_tiny": lambda: _vgg_backbone((16, 32, 64)),
    "cnn_medium": lambda: _vgg_backbone((24, 48, 96)),
    "cnn_small": lambda: _vgg_backbone((32, 64, 128)),
    "resnet_tiny": lambda: _cifar_resnet_backbone(1),
    "resnet20": lambda: _cifar_resnet_backbone(3),
}


# --------------------------------------------------------------------------------------------
# torchvision architectures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TvSpec:
    family: str  # which stem rule applies: resnet | first_conv | shufflenet
    head_attr: str  # attribute holding the ImageNet classifier (a Linear or a Sequential)


_TORCHVISION: dict[str, _TvSpec] = {
    "resnet18": _TvSpec("resnet", "fc"),
    "resnet34": _TvSpec("resnet", "fc"),
    "resnet50": _TvSpec("resnet", "fc"),
    "mobilenet_v3_small": _TvSpec("features0", "classifier"),
    "mobilenet_v3_large": _TvSpec("features0", "classifier"),
    "efficientnet_b0": _TvSpec("features0", "classifier"),
    "shufflenet_v2_x0_5": _TvSpec("shufflenet", "fc"),
    "shufflenet_v2_x1_0": _TvSpec("shufflenet", "fc"),
    "regnet_y_400mf": _TvSpec("regnet", "fc"),
    "regnet_x_400mf": _TvSpec("regnet", "fc"),
}


def _first_conv(net: nn.Module, family: str) -> nn.Conv2d:
    """The stem convolution of a torchvision network of the given family."""
    if family == "features0":  # MobileNetV3, EfficientNet: features[0] is Conv2dNormActivation
        return net.features[0][0]
    if family == "shufflenet":  # conv1 = Sequential(conv, bn, relu)
        return net.conv1[0]
    if family == "regnet":  # stem = SimpleStemIN (a Conv2dNormActivation)
        return net.stem[0]
    raise ValueError(family)


def _adapt_stem(net: nn.Module, family: str) -> None:
    """Apply the small-input stem rule from the module docstring, in place."""
    if family == "resnet":
        out_ch = net.conv1.out_channels
        net.conv1 = nn.Conv2d(3, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        return
    # Changing the stride keeps the (pretrained) kernel usable; padding stays "same" for 3x3.
    _first_conv(net, family).stride = (1, 1)
    if family == "shufflenet":
        net.maxpool = nn.Identity()


def _detach_head(net: nn.Module, attr: str) -> tuple[int, list[nn.Module]]:
    """Cut the final ImageNet Linear off ``net.<attr>``; return its in_features and any Dropout that
    directly precedes it. The Dropout moves into the new head so that :meth:`Classifier.features` is
    deterministic (a feature-distillation target must not be randomly zeroed); hidden layers before
    it (MobileNetV3's Linear+Hardswish) stay in the backbone with their pretrained weights."""
    old = getattr(net, attr)
    if isinstance(old, nn.Linear):
        setattr(net, attr, nn.Identity())
        return old.in_features, []
    layers = list(old)
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    start = last
    while start > 0 and isinstance(layers[start - 1], nn.Dropout):
        start -= 1
    setattr(net, attr, old[:start] if start > 0 else nn.Identity())
    return layers[last].in_features, layers[start:last]


def _resolve_weights(arch: str, weights):
    """A torchvision weights enum member for ``arch`` from a name such as "IMAGENET1K_V1", "DEFAULT"
    or "ResNet18_Weights.IMAGENET1K_V1" (or an enum member itself)."""
    from torchvision.models import get_model_weights, get_weight

    enum_cls = get_model_weights(arch)
    valid = ", ".join(enum_cls.__members__)
    if isinstance(weights, enum_cls):
        return weights
    text = str(weights).strip()
    try:
        member = get_weight(text) if "." in text else enum_cls[text]
    except Exception:  # get_weight raises ValueError/KeyError/AttributeError depending on the part
        raise KdpipeError(f"model '{arch}': unknown weights '{text}' (valid: {valid})") from None
    if not isinstance(member, enum_cls):
        raise KdpipeError(f"model '{arch}': weights '{text}' belong to another architecture (valid: {valid})")
    return member


def _build_torchvision(arch: str, weights) -> nn.Module:
    """Build the ImageNet network, loading pretrained weights (before any surgery) if asked."""
    from torchvision.models import get_model

    from kdpipe.training import pretrained

    if weights is None:
        return get_model(arch, weights=None)
    if str(weights) in pretrained.NAMED_SOURCES:
        raise KdpipeError(
            f"weights '{weights}' are for '{pretrained.NAMED_SOURCES[str(weights)].arch}', "
            f"not for model '{arch}'"
        )
    if pretrained.looks_like_file(str(weights)):
        net = get_model(arch, weights=None)
        pretrained.load_into(net, pretrained.read_state_dict(weights), str(weights), arch)
        return net
    member = _resolve_weights(arch, weights)
    try:
        return get_model(arch, weights=member)
    except Exception as exc:  # URLError, HTTPError, hash mismatch, ... all mean "no usable file"
        hub = os.path.join("$TORCH_HOME", "hub", "checkpoints")
        filename = os.path.basename(member.url)
        raise KdpipeError(
            f"model '{arch}': could not load pretrained weights {member} ({type(exc).__name__}: {exc}). "
            f"Pretrained weights need a reachable model hub or a local torch hub cache: put "
            f"{filename} under {hub} (TORCH_HOME defaults to ~/.cache/torch), or set weights to null."
        ) from None


def _torchvision_parts(
    arch: str, num_classes: int, image_size: int, weights
) -> tuple[nn.Module, nn.Module, int]:
    spec = _TORCHVISION[arch]
    net = _build_torchvision(arch, weights)
    if image_size <= SMALL_INPUT_MAX:
        _adapt_stem(net, spec.family)
    feature_dim, dropouts = _detach_head(net, spec.head_attr)
    linear = nn.Linear(feature_dim, num_classes)
    head = nn.Sequential(*dropouts, linear) if dropouts else linear
    return net, head, feature_dim


# --------------------------------------------------------------------------------------------
# timm architectures
# --------------------------------------------------------------------------------------------

TIMM_PREFIX = "timm/"


def _timm_name(key: str) -> str | None:
    """The timm architecture for a lower-cased model name, or None if timm has no such model."""
    name = key[len(TIMM_PREFIX) :] if key.startswith(TIMM_PREFIX) else key
    if key.startswith(TIMM_PREFIX) or (key not in _TINY and key not in _TORCHVISION):
        import timm

        if timm.is_model(name):
            return name
    return None


def _timm_parts(name: str, num_classes: int, weights) -> tuple[nn.Module, nn.Module, int, tuple, tuple]:
    """A timm backbone (pooled features, no classifier), kdpipe's head, and the mean/std its weights expect.

    timm applies its classifier dropout (``drop_rate``) before the classifier, so the backbone is
    built with ``drop_rate=0`` and the same dropout moves into the head: the features a
    feature-distillation loss compares stay deterministic."""
    net = _create_timm(name, weights)
    cfg = net.pretrained_cfg or {}
    drop = float(getattr(net, "drop_rate", 0.0) or 0.0)
    net.reset_classifier(0)  # the network now ends in global pooling + flatten
    if hasattr(net, "drop_rate"):
        net.drop_rate = 0.0
    # Some architectures (MobileNetV3...) have a hidden layer after the pooling: it stays in the backbone.
    feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    linear = nn.Linear(feature_dim, num_classes)
    head = nn.Sequential(nn.Dropout(drop), linear) if drop > 0 else linear
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    return net, head, feature_dim, mean, std


def _create_timm(name: str, weights) -> nn.Module:
    """The full ImageNet network with ``weights`` loaded (named source, local file or hub tag)."""
    import timm

    from kdpipe.training import pretrained

    if weights is None:
        return timm.create_model(name, pretrained=False)
    text = str(weights).strip()
    if text in pretrained.NAMED_SOURCES:
        source = pretrained.NAMED_SOURCES[text]
        if source.arch != name:
            raise KdpipeError(
                f"weights '{text}' are for '{source.arch}', not for model '{name}'; "
                f"set the architecture to {source.arch} or weights to null"
            )
        net = timm.create_model(name, pretrained=False)
        pretrained.load_into(net, source.load(), f"weights '{text}'", name)
        return net
    if pretrained.looks_like_file(text):
        net = timm.create_model(name, pretrained=False)
        head = (net.pretrained_cfg or {}).get("classifier") or "classifier"
        # A file may hold another number of classes than ImageNet's: its classifier is dropped anyway.
        pretrained.load_into(net, pretrained.read_state_dict(text), text, name, ignore_prefixes=(f"{head}.",))
        return net
    tagged = name if text in ("hub", "default", "DEFAULT") else f"{name}.{text}"
    try:
        return timm.create_model(tagged, pretrained=True)
    except Exception as exc:  # no network, unknown tag, hub errors: all mean "no usable weights"
        raise pretrained.hub_error(name, text, exc, " saved with timm") from None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def available_models(include_timm: bool = False) -> list[str]:
    """The names :func:`build_model` accepts: tiny hand-written models, torchvision's, and (with
    ``include_timm``) every timm architecture."""
    names = list(_TINY) + list(_TORCHVISION)
    if include_timm:
        import timm

        names += [n for n in timm.list_models() if n not in names]
    return names


def is_timm(name: str) -> bool:
    """True when ``name`` builds a timm network (not a tiny or torchvision one)."""
    return _timm_name(str(name).strip().lower()) is not None


def _check_name(name: str) -> str:
    key = str(name).strip().lower()
    if key in _TINY or key in _TORCHVISION:
        return key
    timm_name = _timm_name(key)
    if timm_name is not None:
        return timm_name
    names = available_models(include_timm=True)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(names)}"
    raise KdpipeError(f"unknown model architecture '{name}'; {hint}")


def _check_sizes(num_classes: int, image_size: int) -> None:
    if int(num_classes) < 1:
        raise KdpipeError(f"num_classes must be >= 1, got {num_classes}")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise KdpipeError(f"image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")


def build_model(
    name: str,
    num_classes: int,
    image_size: int = 32,
    weights=None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | None = None,
) -> Classifier:
    """Build architecture ``name`` for ``num_classes`` classes and square inputs of ``image_size``.

    ``weights``: see :mod:`kdpipe.training.pretrained` (null, a named offline source, a local file, or a hub
    name); they are loaded into the ImageNet network before its head is replaced. ``image_size``
    only selects the stem of torchvision networks (see the module docstring); every network
    accepts any input size >= 8 thanks to global pooling. ``input_size`` makes the network resize
    its input to that resolution first (and picks the stem for it). ``mean``/``std`` default to the
    constants the architecture's weights expect (ImageNet's unless timm says otherwise).
    """
    arch = _check_name(name)
    _check_sizes(num_classes, image_size)
    if input_size is not None:
        _check_sizes(num_classes, input_size)
    compute_size = int(input_size or image_size)
    arch_mean, arch_std = IMAGENET_MEAN, IMAGENET_STD
    if arch in _TINY:
        if weights is not None:
            raise KdpipeError(f"model '{arch}' has no pretrained weights; set weights to null")
        backbone, feature_dim = _TINY[arch]()
        head = nn.Linear(feature_dim, int(num_classes))
    elif arch in _TORCHVISION:
        backbone, head, feature_dim = _torchvision_parts(arch, int(num_classes), compute_size, weights)
    else:
        backbone, head, feature_dim, arch_mean, arch_std = _timm_parts(arch, int(num_classes), weights)
    mean = arch_mean if mean is None else tuple(mean)
    std = arch_std if std is None else tuple(std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise KdpipeError(f"normalisation needs 3 means and 3 positive stds, got mean={mean} std={std}")
    resize = int(input_size) if input_size is not None and int(input_size) != int(image_size) else None
    return Classifier(backbone, head, feature_dim, arch=arch, mean=mean, std=std, input_size=resize)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the normalisation constants are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
