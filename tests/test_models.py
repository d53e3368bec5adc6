"""Tests for kdpipe.training.models: the zoo's shapes, built-in normalisation, stems, errors and ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.core.errors import KdpipeError
from kdpipe.training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    available_models,
    build_model,
    count_parameters,
)

TORCHVISION_ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "regnet_y_400mf",
    "regnet_x_400mf",
]
TINY_ARCHS = ["cnn_tiny", "cnn_medium", "cnn_small", "resnet_tiny", "resnet20"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_available_models_lists_every_architecture():
    assert set(available_models()) == set(TINY_ARCHS + TORCHVISION_ARCHS)


@pytest.mark.parametrize("arch", TINY_ARCHS + TORCHVISION_ARCHS)
def test_builds_and_forwards_at_32(arch):
    model = build_model(arch, num_classes=10, image_size=32).eval()
    assert isinstance(model, Classifier)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        logits2, feats2 = model.forward_with_features(x)
    assert logits.shape == (2, 10)
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(logits, logits2)
    torch.testing.assert_close(feats, feats2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("size", [8, 17, 64, 96])
def test_tiny_models_accept_any_size(arch, size):
    model = build_model(arch, num_classes=3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, size, size)).shape == (2, 3)


def test_features_are_deterministic_in_train_mode():
    # efficientnet's Dropout must live in the head, not in the features a distillation loss compares.
    model = build_model("efficientnet_b0", num_classes=4, image_size=32).train()
    assert any(isinstance(m, nn.Dropout) for m in model.head.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.backbone.modules())


def test_normalisation_is_the_first_layer():
    model = build_model("cnn_tiny", num_classes=10).eval()
    assert next(iter(model.children())) is model.normalize
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(IMAGENET_STD))
    # The buffers are in the state_dict, so checkpoints (and ONNX) carry the preprocessing.
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.backbone(model.normalize(x))))
        assert not torch.allclose(model(x), model.head(model.backbone(x)))


def test_custom_normalisation_survives_state_dict_round_trip():
    model = build_model("cnn_tiny", num_classes=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rebuilt = build_model("cnn_tiny", num_classes=2)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.normalize.std.flatten(), torch.full((3,), 0.25))


def test_rebuild_from_state_dict_gives_identical_outputs():
    # checkpoints.load_model relies on build_model(arch, num_classes, image_size) being reproducible.
    model = build_model("mobilenet_v3_small", num_classes=5, image_size=32).eval()
    rebuilt = build_model("mobilenet_v3_small", num_classes=5, image_size=32).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rebuilt(x))


def test_unknown_name_suggests_closest():
    with pytest.raises(KdpipeError) as info:
        build_model("resnet19", num_classes=10)
    assert "resnet19" in str(info.value)
    assert "resnet18" in str(info.value)


def test_name_lookup_ignores_case():
    assert build_model("CNN_Tiny", num_classes=2).arch == "cnn_tiny"


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 3, "image_size": 4}])
def test_invalid_sizes_raise(kwargs):
    with pytest.raises(KdpipeError):
        build_model("cnn_tiny", **kwargs)


def test_cnn_tiny_parameter_count():
    model = build_model("cnn_tiny", num_classes=10)
    assert 50_000 <= count_parameters(model) <= 120_000
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 64 * 10 + 10


def test_resnet18_stem_adapted_for_small_inputs_only():
    small = build_model("resnet18", num_classes=10, image_size=32).backbone
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", num_classes=10, image_size=224).backbone
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize(
    ("arch", "first_conv"),
    [
        ("mobilenet_v3_small", lambda b: b.features[0][0]),
        ("efficientnet_b0", lambda b: b.features[0][0]),
        ("regnet_x_400mf", lambda b: b.stem[0]),
        ("shufflenet_v2_x0_5", lambda b: b.conv1[0]),
    ],
)
def test_other_stems_use_stride_1_for_small_inputs(arch, first_conv):
    assert first_conv(build_model(arch, num_classes=2, image_size=64).backbone).stride == (1, 1)
    assert first_conv(build_model(arch, num_classes=2, image_size=65).backbone).stride == (2, 2)


def test_shufflenet_maxpool_removed_for_small_inputs():
    assert isinstance(build_model("shufflenet_v2_x1_0", 2, image_size=32).backbone.maxpool, nn.Identity)


def test_weights_for_tiny_model_rejected():
    with pytest.raises(KdpipeError, match="no pretrained weights"):
        build_model("cnn_tiny", num_classes=2, weights="IMAGENET1K_V1")


@pytest.mark.parametrize(
    "weights",
    ["IMAGENET_BOGUS", "ResNet18_Weights.BOGUS", "Bogus_Weights.X", "ResNet50_Weights.IMAGENET1K_V1"],
)
def test_bogus_weights_name_gives_clear_error(weights):
    with pytest.raises(KdpipeError) as info:
        build_model("resnet18", num_classes=2, weights=weights)
    message = str(info.value)
    assert "resnet18" in message and "IMAGENET1K_V1" in message


def test_unreachable_hub_gives_clear_error(monkeypatch, tmp_path):
    # No network is touched: the download itself is replaced by a failure.
    from urllib.error import URLError

    from torchvision.models import ResNet18_Weights

    def fail(self, *args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", fail)
    with pytest.raises(KdpipeError) as info:
        build_model("resnet18", num_classes=2, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert "TORCH_HOME" in str(info.value) and "model hub" in str(info.value)


# dynamo=False (TorchScript exporter) is deliberate; its deprecation warning is not our concern here.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("arch", ["cnn_tiny", "resnet_tiny", "mobilenet_v3_small"])
def test_onnx_export_with_dynamic_batch(arch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_model(arch, num_classes=7, image_size=32).eval()
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(
        model,
        torch.rand(1, 3, 32, 32),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, 32, 32)
        (out,) = session.run(None, {"images": x.numpy()})
        assert out.shape == (batch, 7)
        with torch.no_grad():
            np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-3, atol=1e-4)


def test_channels_last_auto_on_cpu_only_for_nets_without_grouped_convs():
    """Measured here: channels_last speeds a plain 3x3 CNN up 1.4x on the CPU and slows depthwise nets."""
    from kdpipe.training.devices import make_runtime

    auto = make_runtime("cpu", "off", "auto")
    assert auto.wants_channels_last(build_model("cnn_tiny", 3))
    assert not auto.wants_channels_last(build_model("mobilenet_v3_small", 3))
    assert not make_runtime("cpu", "off", "off").wants_channels_last(build_model("cnn_tiny", 3))
    assert make_runtime("cpu", "off", "on").wants_channels_last(build_model("mobilenet_v3_small", 3))
