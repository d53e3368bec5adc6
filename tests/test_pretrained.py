"""Pretrained backbones: timm models in the zoo, the offline EfficientNet-Lite0 converter (checked
against the package's own reference implementation), local weight files, hub errors offline, and
the teacher's own input resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.core.errors import KdpipeError
from kdpipe.training.models import Classifier, build_model, is_timm
from kdpipe.training.pretrained import (
    LITE0_STAGE_DEPTHS,
    convert_efficientnet_lite0,
    efficientnet_lite0_file,
    read_state_dict,
)

LITE0 = "tf_efficientnet_lite0"
SMALL_TIMM = "mobilenetv3_small_050"  # a small timm architecture for the local-file tests


@pytest.fixture(scope="module")
def reference_lite0():
    """The reference implementation the weights were published with (test-only dependency)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    model = reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(efficientnet_lite0_file())
    )
    return model.eval()


@pytest.fixture(scope="module")
def converted_timm_lite0():
    import timm

    net = timm.create_model(LITE0, pretrained=False)  # with its 1000-class ImageNet classifier
    net.load_state_dict(convert_efficientnet_lite0(read_state_dict(efficientnet_lite0_file())))
    return net.eval()


def _fixed_input(size: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, size, size, generator=generator)


# ------------------------------------------------------------------------------ the converter
def test_converter_maps_every_key_one_to_one():
    reference = read_state_dict(efficientnet_lite0_file())
    converted = convert_efficientnet_lite0(reference)
    assert len(converted) == len(reference) == 296
    assert sum(LITE0_STAGE_DEPTHS) == 16
    assert converted["conv_stem.weight"] is reference["_conv_stem.weight"]  # tensors pass through untouched
    assert (
        converted["blocks.0.0.conv_pw.weight"] is reference["_blocks.0._project_conv.weight"]
    )  # depthwise-separable
    assert (
        converted["blocks.6.0.conv_pwl.weight"] is reference["_blocks.15._project_conv.weight"]
    )  # last block
    assert converted["classifier.weight"].shape == (1000, 1280)


def test_converted_weights_give_the_reference_logits(reference_lite0, converted_timm_lite0):
    x = _fixed_input(224)
    with torch.no_grad():
        expected = reference_lite0(x)
        got = converted_timm_lite0(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_kdpipe_model_gives_the_reference_features(reference_lite0):
    """build_model's Lite0 with the named offline weights: resize + [-1, 1] normalisation inside the
    network, then the reference network's pooled features -- the contract export and predict rely on."""
    model = build_model(
        LITE0, num_classes=10, image_size=32, weights="efficientnet_lite0_imagenet", input_size=96
    ).eval()
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.full((3,), 0.5))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tf_input = (
        nn.functional.interpolate(images, size=(96, 96), mode="bilinear", align_corners=False) - 0.5
    ) / 0.5
    with torch.no_grad():
        expected = reference_lite0._avg_pooling(reference_lite0.extract_features(tf_input)).flatten(1)
        got = model.features(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert model(images).shape == (2, 10)


def test_named_weights_refuse_another_architecture():
    with pytest.raises(KdpipeError, match="tf_efficientnet_lite0"):
        build_model("resnet18", num_classes=3, weights="efficientnet_lite0_imagenet")
    with pytest.raises(KdpipeError, match="tf_efficientnet_lite0"):
        build_model(SMALL_TIMM, num_classes=3, weights="efficientnet_lite0_imagenet")


# ------------------------------------------------------------------------------ timm in the zoo
def test_any_timm_name_builds_a_classifier():
    assert is_timm(LITE0) and is_timm("timm/resnet18") and not is_timm("resnet18") and not is_timm("cnn_tiny")
    model = build_model(SMALL_TIMM, num_classes=4, image_size=32).eval()
    assert isinstance(model, Classifier) and model.arch == SMALL_TIMM
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_with_features(x)
    assert logits.shape == (3, 4) and feats.shape == (3, model.feature_dim)
    # the head is the only part that depends on the classes; the backbone ends in pooled features
    assert isinstance(model.head, nn.Linear) or isinstance(model.head[-1], nn.Linear)
    assert build_model("timm/resnet18", num_classes=2).arch == "resnet18"


def test_unknown_name_still_suggests_close_names():
    with pytest.raises(KdpipeError, match="tf_efficientnet_lite0"):
        build_model("tf_efficientnet_lite00", num_classes=2)


# ------------------------------------------------------------------------------ local files
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_from_a_local_file(tmp_path, suffix):
    import timm

    source = timm.create_model(SMALL_TIMM, pretrained=False, num_classes=1000)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)  # not what a fresh build gives
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a wrapped state dict is accepted too
    model = build_model(SMALL_TIMM, num_classes=5, image_size=32, weights=str(path))
    loaded = model.backbone.state_dict()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, state[name], msg=name)
    assert model.head.out_features == 5  # the file's 1000-class classifier was dropped


def test_torchvision_weights_from_a_local_file(tmp_path):
    from torchvision.models import resnet18

    source = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=3, image_size=224, weights=str(path))
    torch.testing.assert_close(model.backbone.layer4[0].conv1.weight, source.layer4[0].conv1.weight)


def test_missing_local_file_names_it(tmp_path):
    with pytest.raises(KdpipeError, match="weights file not found") as info:
        build_model(SMALL_TIMM, num_classes=2, weights=str(tmp_path / "nowhere.safetensors"))
    assert "nowhere.safetensors" in str(info.value)


def test_weights_of_another_architecture_are_refused_clearly(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), path)
    with pytest.raises(KdpipeError) as info:
        build_model(SMALL_TIMM, num_classes=2, weights=str(path))
    message = str(info.value)
    assert str(path) in message and "do not fit" in message and "missing" in message


def test_a_file_that_is_not_weights_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(KdpipeError, match="not a readable weights file"):
        build_model(SMALL_TIMM, num_classes=2, weights=str(path))


# ------------------------------------------------------------------------------ hub names offline
def test_hub_weights_offline_fail_with_one_clear_line(monkeypatch):
    # HF_HUB_OFFLINE makes the hub refuse at once instead of trying the network (and retrying for
    # tens of seconds). huggingface_hub reads it when first imported, so set its constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(KdpipeError) as info:
        build_model(SMALL_TIMM, num_classes=2, weights="hub")
    message = str(info.value)
    assert "\n" not in message
    assert SMALL_TIMM in message and "local file" in message and "efficientnet_lite0_imagenet" in message


# ------------------------------------------------------------------------------ input resolution
def test_input_size_resizes_before_the_backbone():
    model = build_model("cnn_tiny", num_classes=3, image_size=16, input_size=48).eval()
    seen = []
    model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
        model(torch.rand(2, 3, 48, 48))  # already at the teacher's size: passed through
    assert seen == [(2, 3, 48, 48), (2, 3, 48, 48)]
    # same size as the images: nothing to do, no resize module at all
    assert build_model("cnn_tiny", num_classes=3, image_size=16, input_size=16).input_size is None


def test_input_size_survives_a_checkpoint(tmp_path):
    from kdpipe.training import checkpoints

    model = build_model("cnn_tiny", num_classes=3, image_size=16, input_size=40)
    ckpt = checkpoints.model_checkpoint(model, "cnn_tiny", 3, 16, ["a", "b", "c"])
    assert ckpt["image_size"] == 16 and ckpt["input_size"] == 40
    checkpoints.save(ckpt, tmp_path / "m.pt")
    rebuilt, _ = checkpoints.load_model(tmp_path / "m.pt")
    assert rebuilt.input_size == 40
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_onnx_export_of_a_resizing_model_keeps_the_image_size(tmp_path):
    """A teacher that computes at 48 px is still exported for the data's 16 px images."""
    from kdpipe.export.onnx import CPU, export_onnx, make_session

    model = build_model("cnn_tiny", num_classes=3, image_size=16, input_size=48).eval()
    session = make_session(export_onnx(model, tmp_path / "m.onnx", 16, 17), [CPU])
    assert session.get_inputs()[0].shape[2:] == [16, 16]
    x = torch.rand(2, 3, 16, 16)
    (out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-3, atol=1e-4)
