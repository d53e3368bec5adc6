"""Typed schema of ``params.yaml``.

``params.yaml`` is the single source of defaults, grouped by pipeline step. Every group is a
pydantic model with ``extra="forbid"``, so an unknown or mistyped key is an error (with the closest
valid key suggested), and every number carries its allowed range, which the error message repeats.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ParamsError

DEFAULT_PARAMS_FILE = "params.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Group):
    root: str = Field("data", description="folder holding labeled/, unlabeled/ and test/")
    prepared: str = Field("artifacts/prepared", description="output folder of the prepare step")


class PrepareParams(_Group):
    image_size: int = Field(32, ge=8, le=1024, description="side of the square training images")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of labeled images kept for validation")
    seed: int = Field(0, ge=0)
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="larger images are rejected as decompression bombs"
    )
    min_side: int = Field(2, ge=1, description="images with a smaller side are rejected")
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="longer/shorter side above this is rejected")


class AugmentParams(_Group):
    views: int = Field(3, ge=1, le=16, description="K augmented views stored per training sample")
    p: float = Field(0.5, ge=0.0, le=1.0, description="share of the stored views that get the strong policy")
    num_ops: int = Field(2, ge=0, le=8, description="RandAugment ops per strongly augmented sample")
    magnitude: float = Field(0.5, ge=0.0, le=1.0, description="RandAugment strength, 0..1")
    erase_prob: float = Field(0.5, ge=0.0, le=1.0, description="random erasing probability inside the strong policy")
    pad: int = Field(4, ge=0, le=64, description="padding of the weak random crop, in pixels")
    flip: bool = Field(True, description="random horizontal flip in the weak ops (off for digits)")
    preview_samples: int = Field(8, ge=0, le=64)
    seed: int = Field(0, ge=0)
    max_unlabeled: int = Field(0, ge=0, description="0 = views for every unlabeled image")
    teacher_logits: bool = Field(
        True, description="store the teacher's logits on every view (frozen-teacher recipes then never run it)")
    teacher_inference: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="what computes those logits; auto = onnxruntime on a CPU device, torch on CUDA")


class TeacherParams(_Group):
    arch: str = Field("tf_efficientnet_lite0", description="model name: a kdpipe tiny net, torchvision or timm")
    checkpoint: str | None = Field(None, description="path of a trained kdpipe teacher checkpoint: skips training")
    weights: str | None = Field(
        "efficientnet_lite0_imagenet",
        description="pretrained weights: null, a named offline source, a local state-dict/safetensors file, "
                    "or a hub weights name (needs a network)",
    )
    image_size: int | None = Field(
        None, ge=8, le=1024,
        description="resolution the teacher computes at (inputs are upsampled on the device; prepare keeps a "
                    "copy at this size when the source images are larger); null = the student's prepare.image_size",
    )
    max_iterations: int = Field(150, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of the new head")
    backbone_lr_scale: float = Field(
        0.1, ge=0.0, le=10.0, description="backbone learning rate = lr x this (pretrained layers move slowly)")
    freeze_backbone_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of the iterations, at the start, that train the head alone (backbone frozen)")
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-5, ge=0.0, le=1.0, description="on weights only, never on norms and biases")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_batchnorm: bool = Field(
        True, description="keep the pretrained BatchNorm statistics while fine-tuning (small labeled sets)")
    eval_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)


class TrainParams(_Group):
    recipe: Literal["supervised", "kd", "cotrain", "adaptive", "consistency", "full"] = "full"
    student_arch: str = Field("cnn_tiny", description="model name from kdpipe.models")
    weights: str | None = Field(None, description="torchvision weights enum name for the student")
    batch_size: int = Field(64, ge=1, description="labeled samples per batch")
    mu: float = Field(1.0, ge=0.0, le=16.0, description="unlabeled samples per labeled sample in a batch")
    lr: float = Field(0.05, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_iterations: int = Field(400, ge=1)
    epoch_iterations: int = Field(50, ge=1, description="iterations per Method A schedule step (an 'epoch')")
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    patience: int = Field(0, ge=0, description="evaluations without improvement before stopping; 0 = off")
    target_metric: float = Field(1.01, ge=0.0, le=1.01, description="stop when validation accuracy reaches it")
    tau: float = Field(1.0, gt=0.0, le=100.0, description="temperature of the KD terms (kd, adaptive, consistency)")
    # Method C
    mutual_tau: float = Field(
        1.0, gt=0.0, le=100.0,
        description="temperature of the mutual (DML) term; separate because that term is not tau^2-scaled")
    w_mutual: float = Field(1.0, ge=0.0, le=100.0)
    w_feat: float = Field(0.0, ge=0.0, le=100.0)
    teacher_trainable: bool = True
    teacher_lr_scale: float = Field(
        0.1, gt=0.0, le=10.0,
        description="teacher LR = lr x this when co-trained; < 1 keeps an already trained teacher from being undone",
    )
    # Method A
    schedule_rule: Literal["adaptive", "linear", "fixed"] = "adaptive"
    p_max: float = Field(0.8, ge=0.0, le=1.0, description="Method A: the strongest augmentation probability")
    p_fixed: float | None = Field(
        None, ge=0.0, le=1.0, description="Method A, rule 'fixed': the constant p1; null = p_max / 2")
    delta: float = Field(0.0, ge=0.0, le=1.0)
    w_init: float = Field(1.0, ge=0.0, le=1.0)
    w_min: float = Field(0.3, ge=0.0, le=1.0)
    w_step: float = Field(0.1, ge=0.0, le=1.0)
    pseudo_threshold: float = Field(0.0, ge=0.0, le=1.0)
    # Method B
    views: int = Field(3, ge=1, le=16)
    a: float = Field(1.0, ge=0.0, le=100.0, description="weight of the ground-truth CE term")
    b: float = Field(1.0, ge=0.0, le=100.0, description="weight of the multi-view consistency term")
    c: float = Field(1.0, ge=0.0, le=100.0, description="weight of the student-teacher KD term")
    # devices
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_recipe(self) -> TrainParams:
        if self.recipe in ("consistency", "full") and self.views < 2:
            raise ValueError(
                f"train.views: the {self.recipe!r} recipe compares views, so it needs views >= 2 (got {self.views})"
            )
        if self.recipe in ("cotrain", "full") and self.mu == 0:
            raise ValueError(
                f"train.mu: the {self.recipe!r} recipe trains on unlabeled data, so mu must be > 0 (got 0)"
            )
        if self.w_min > self.w_init:
            raise ValueError(f"train.w_min ({self.w_min}) must not exceed train.w_init ({self.w_init})")
        return self


class SelectParams(_Group):
    max_params: int = Field(
        2_000_000, ge=1,
        description="deployment limit on parameter count (keeps a large co-trained teacher out of deployment)")
    max_latency_ms: float = Field(1000.0, gt=0.0, description="deployment limit, onnxruntime batch 1")
    latency_runs: int = Field(30, ge=1, le=10_000)
    fallback_fastest: bool = Field(False, description="if nothing fits the limits, take the fastest")
    include_champion: bool = Field(False, description="also consider the registry's current champion")


class ExportParams(_Group):
    opset: int = Field(18, ge=13, le=23)
    parity_max_abs: float = Field(1e-3, gt=0.0, description="largest allowed torch vs onnxruntime logit gap")
    parity_min_agreement: float = Field(0.99, ge=0.0, le=1.0)
    parity_samples: int = Field(256, ge=1)
    int8: bool = True
    int8_min_agreement: float = Field(0.9, ge=0.0, le=1.0)
    calibration_samples: int = Field(128, ge=1)


class EvaluateParams(_Group):
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    allow_cpu_fallback: bool = False
    latency_runs: int = Field(50, ge=1, le=100_000)
    throughput_batch: int = Field(64, ge=1)


class RegisterParams(_Group):
    model_name: str = Field("kdpipe-classifier", min_length=1)
    tracking_uri: str | None = Field(None, description="MLflow URI; env MLFLOW_TRACKING_URI wins; default local SQLite")
    experiment: str = Field("kdpipe", min_length=1)
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="quality gate before registering")
    track_steps: bool = Field(True, description="log every step's params, curves and reports to MLflow")


# pydantic warns that a field named "register" shadows ABCMeta.register; instance attribute
# access still returns the field, so the warning is silenced for this one class.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Params(_Group):
        data: DataParams = Field(default_factory=DataParams)
        prepare: PrepareParams = Field(default_factory=PrepareParams)
        augment: AugmentParams = Field(default_factory=AugmentParams)
        teacher: TeacherParams = Field(default_factory=TeacherParams)
        train: TrainParams = Field(default_factory=TrainParams)
        select: SelectParams = Field(default_factory=SelectParams)
        export: ExportParams = Field(default_factory=ExportParams)
        evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
        register: RegisterParams = Field(default_factory=RegisterParams)


def _fields_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """Walk the schema along an error location; return the model holding the last key."""
    model: type[BaseModel] = Params
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None, {}
        model = field.annotation
    return model, dict(model.model_fields)


def _describe_range(loc: tuple[Any, ...]) -> str:
    model, fields = _fields_at(loc)
    field = fields.get(str(loc[-1])) if model else None
    if field is None:
        return ""
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                bounds.append(f"{sign} {value}")
    ann = getattr(field.annotation, "__name__", str(field.annotation))
    text = f"expected {ann}"
    if bounds:
        text += " " + " and ".join(bounds)
    return text


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        _, fields = _fields_at(loc)
        close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
        valid = ", ".join(fields)
        return f"{source}: unknown key '{key}'{hint} (valid keys here: {valid})"
    if err["type"] == "value_error":
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    allowed = _describe_range(loc)
    got = err.get("input")
    return f"{source}: invalid value for '{key}': {err['msg']} (got {got!r}; {allowed})".replace("; )", ")")


def validate_params(raw: dict[str, Any] | None, source: str = DEFAULT_PARAMS_FILE) -> Params:
    """Build :class:`Params` from a nested dict, turning schema errors into one readable message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of step groups at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(err, source) for err in exc.errors()]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml (missing file = all defaults), then apply ``key=value`` overrides."""
    import yaml

    # Only the implicit default may be absent; a file named on purpose (argument or env) must exist,
    # or a typo in --params would silently train with the defaults.
    explicit = path is not None or bool(os.environ.get("KDPIPE_PARAMS"))
    path = Path(path or os.environ.get("KDPIPE_PARAMS") or DEFAULT_PARAMS_FILE)
    raw: dict[str, Any] = {}
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ParamsError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    elif explicit:
        raise ParamsError(f"{path}: params file not found")
    for item in overrides or []:
        _apply_override(raw, item, str(path))
    return validate_params(raw, str(path))


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    import yaml

    if "=" not in item:
        raise ParamsError(f"override {item!r}: expected group.key=value")
    dotted, value = item.split("=", 1)
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {item!r}: '{part}' is not a group in {source}")
    node[parts[-1]] = yaml.safe_load(value)


def dump_defaults() -> dict[str, Any]:
    return Params().model_dump(mode="json")
