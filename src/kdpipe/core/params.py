"""Typed schema of ``params.yaml``.

``params.yaml`` is the single source of defaults, grouped by pipeline step. Every group is a
pydantic model with ``extra="forbid"``, so an unknown or mistyped key is an error (with the closest
valid key suggested), and every number carries its allowed range, which the error message repeats.
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdpipe.core.errors import ParamsError

DEFAULT_PARAMS_FILE = "params.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """YAML reads ``true``/``false`` as booleans, which pydantic would accept as 1/0 for a number:
        ``batch_size: true`` is a mistake, not a batch of one."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and _is_number(field.annotation):
                    raise ValueError(
                        f"{cls._group_name()}.{name}: expected a number, got the boolean {value}"
                    )
        return data

    @classmethod
    def _group_name(cls) -> str:
        return cls.__name__.removesuffix("Params").lower()


def _is_number(annotation: Any) -> bool:
    """int, float, or an optional one (``int | None``)."""
    args = getattr(annotation, "__args__", None) or (annotation,)
    return any(a in (int, float) for a in args) and bool not in args


class DataParams(_Group):
    root: str = Field("data", description="folder holding labeled/, unlabeled/ and test/")


class PrepareParams(_Group):
    image_size: int = Field(32, ge=8, le=1024, description="side of the square training images")
    val_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description="share of labeled images kept for validation; 0 = none, every label trains (fixed training "
        "schedules, the teacher checked by cross-validation, select ranks by agreement with the teacher)",
    )
    seed: int = Field(0, ge=0)
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="larger images are rejected as decompression bombs"
    )
    min_side: int = Field(2, ge=1, description="images with a smaller side are rejected")
    max_aspect_ratio: float = Field(20.0, ge=1.0, description="longer/shorter side above this is rejected")
    workers: int = Field(0, ge=0, le=512, description="processes decoding images; 0 = one per core")


class AugmentParams(_Group):
    # Each stored view costs one teacher inference per image; the student sees K versions of every image,
    # so more views let it train longer before it memorises them (function matching, docs/methods.md).
    views: int = Field(8, ge=1, le=64, description="K augmented views stored per training sample")
    p: float = Field(0.5, ge=0.0, le=1.0, description="share of the stored views that get the strong policy")
    num_ops: int = Field(2, ge=0, le=8, description="RandAugment ops per strongly augmented sample")
    magnitude: float = Field(0.5, ge=0.0, le=1.0, description="RandAugment strength, 0..1")
    erase_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="random erasing probability inside the strong policy"
    )
    pad: int = Field(4, ge=0, le=64, description="padding of the weak random crop, in pixels")
    flip: bool = Field(True, description="random horizontal flip in the weak ops (off for digits)")
    preview_samples: int = Field(8, ge=0, le=64)
    seed: int = Field(0, ge=0)
    max_unlabeled: int = Field(0, ge=0, description="0 = views for every unlabeled image")
    teacher_logits: bool = Field(
        True,
        description="store the teacher's logits on every view (frozen-teacher recipes then never run it)",
    )
    logits_dtype: Literal["float16", "float32"] = Field(
        "float16", description="precision of the cached teacher logits (float16: half the disk, same lessons)"
    )
    teacher_inference: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="what computes those logits; auto = onnxruntime on a CPU device, torch on CUDA"
    )


class TeacherParams(_Group):
    arch: str = Field(
        "tf_efficientnet_lite0", description="model name: a kdpipe tiny net, torchvision or timm"
    )
    checkpoint: str | None = Field(
        None, description="path of a trained kdpipe teacher checkpoint: skips training"
    )
    weights: str | None = Field(
        "efficientnet_lite0_imagenet",
        description="pretrained weights: null, a named offline source, a local state-dict/safetensors file, "
        "or a hub weights name (needs a network)",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="resolution the teacher computes at (inputs are upsampled on the device; prepare keeps a "
        "copy at this size when the source images are larger); null = the student's prepare.image_size",
    )
    linear_probe: bool = Field(
        True,
        description="fit a linear probe on the frozen pretrained features first: the fine-tuned teacher never "
        "ends below it by more than one standard error on the scoring images (the probe's network is "
        "kept instead)",
    )
    head_from_probe: bool = Field(
        False,
        description="start the fine-tuning from the probe's head (LP-FT); measured on CIFAR-10 with 1,800 "
        "labels: 1 point below a fresh head (BENCHMARKS.md)",
    )
    probe_folds: int = Field(
        5, ge=2, le=20, description="cross-validation folds of the linear probe's L2 strength"
    )
    folds: int = Field(
        3,
        ge=0,
        le=20,
        description="without a validation split (prepare.val_fraction 0): folds of the cross-validation that scores "
        "the probe and the fine-tuning (each fold one more fine-tuning); 0 = no check",
    )
    epochs: float | None = Field(
        10.0,
        gt=0.0,
        le=1000.0,
        description="fine-tuning length in passes over the labeled images (few labels: few steps), at most "
        "max_iterations; null = max_iterations",
    )
    max_iterations: int = Field(150, ge=1)
    unlabeled_rounds: int = Field(
        0,
        ge=0,
        le=10,
        description="Noisy Student rounds: the teacher relearns on its own confident pseudo-labels of "
        "the unlabeled images, under strong augmentation (kept only if validation improves)",
    )
    pseudo_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="softmax confidence a pseudo-label needs"
    )
    pseudo_max: int = Field(
        20000, ge=1, description="at most this many pseudo-labeled images per round (most confident)"
    )
    unlabeled_epochs: float = Field(
        1.0,
        gt=0.0,
        le=1000.0,
        description="passes over labels + pseudo-labels per round, at most max_iterations",
    )
    student_check_iterations: int = Field(
        200,
        ge=0,
        description="train the student alone on the labels this long and warn when the teacher is no "
        "better (0 = skip the check)",
    )
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of the new head")
    backbone_lr_scale: float = Field(
        0.1, ge=0.0, le=10.0, description="backbone learning rate = lr x this (pretrained layers move slowly)"
    )
    freeze_backbone_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of the iterations, at the start, that train the head alone (backbone frozen)",
    )
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(
        5e-5, ge=0.0, le=1.0, description="on weights only, never on norms and biases"
    )
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    freeze_batchnorm: bool = Field(
        True, description="keep the pretrained BatchNorm statistics while fine-tuning (small labeled sets)"
    )
    eval_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)


# The training recipes (kdpipe.training.recipes builds each; docs/methods.md explains them).
RECIPE_NAMES = ("supervised", "kd", "cotrain", "adaptive", "consistency", "full")
# Old names of train settings -> their descriptive names (the old ones are accepted, with a warning).
RENAMED_TRAIN_SETTINGS = {
    "a": "w_labels",
    "b": "w_consistency",
    "c": "w_distill",
    "w_feat": "w_features",
    "delta": "progress_margin",
}


class TrainParams(_Group):
    recipe: Literal[RECIPE_NAMES] = "kd"
    student_arch: str = Field("cnn_tiny", description="model name from kdpipe.training.models")
    weights: str | None = Field(
        None,
        description="the student's pretrained weights (as teacher.weights: null, a named offline source, a "
        "local state-dict/safetensors file, or a hub name)",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="images per batch (with mu set: labeled images per batch, plus mu x this unlabeled)",
    )
    mu: float | None = Field(
        None,
        ge=0.0,
        le=64.0,
        description="unlabeled images per labeled image in a batch; null = batch_size images shared in proportion "
        "to the two pools, so every image is drawn about equally often",
    )
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_iterations: int = Field(300, ge=1)
    epoch_iterations: int = Field(
        50,
        ge=0,
        description="iterations per adaptive-schedule step (an 'epoch'); 0 = one pass over the labeled images",
    )
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    patience: int = Field(0, ge=0, description="evaluations without improvement before stopping; 0 = off")
    keep_checkpoint: Literal["auto", "best", "last"] = Field(
        "auto",
        description="the checkpoint that is the result: best on validation, or last; auto = last for kd "
        "(a long cosine schedule ends at its best), best for the other recipes",
    )
    target_metric: float = Field(
        1.01, ge=0.0, le=1.01, description="stop when validation accuracy reaches it"
    )
    tau: float = Field(
        1.0, gt=0.0, le=100.0, description="temperature of the KD terms (kd, adaptive, consistency)"
    )
    # Loss weights (docs/methods.md says which recipe uses which)
    w_labels: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="weight of the cross-entropy on the labels (consistency; older name a)",
    )
    w_kd_labels: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="kd: weight of a cross-entropy on the labels beside distillation (0 = the labels reach the student "
        "through the teacher only)",
    )
    w_distill: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="weight of the distillation term from the teacher (kd, consistency; older name c)",
    )
    w_consistency: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="weight of the consistency term between the student's views (consistency, full; older name b)",
    )
    w_mutual: float = Field(
        1.0, ge=0.0, le=100.0, description="weight of the mutual-learning term (cotrain, full)"
    )
    w_features: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="weight of feature matching through a learned projection (cotrain, full; 0 = off)",
    )
    # Co-training (recipe cotrain)
    mutual_tau: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="temperature of the mutual (DML) term; separate because that term is not tau^2-scaled",
    )
    teacher_trainable: bool = Field(True, description="cotrain/full: update the teacher too (false = frozen)")
    teacher_lr_scale: float = Field(
        0.1,
        gt=0.0,
        le=10.0,
        description="teacher LR = lr x this when co-trained; < 1 keeps an already trained teacher from being undone",
    )
    # Adaptive augmentation (recipe adaptive)
    schedule_rule: Literal["adaptive", "linear", "fixed"] = "adaptive"
    p_max: float = Field(
        0.8, ge=0.0, le=1.0, description="adaptive schedule: the strongest augmentation probability"
    )
    p_fixed: float | None = Field(
        None, ge=0.0, le=1.0, description="adaptive schedule, rule 'fixed': the constant p1; null = p_max / 2"
    )
    progress_margin: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="adaptive schedule: the smallest rise of validation accuracy that counts as progress",
    )
    w_init: float = Field(
        1.0, ge=0.0, le=1.0, description="adaptive schedule: initial weight w of the KD term (truth: 1 - w)"
    )
    w_min: float = Field(0.3, ge=0.0, le=1.0, description="adaptive schedule: w never drops below this")
    w_step: float = Field(
        0.1, ge=0.0, le=1.0, description="adaptive schedule: how much w drops after an epoch without progress"
    )
    pseudo_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="adaptive schedule: teacher confidence needed to pseudo-label an unlabeled image",
    )
    # Multi-view consistency (recipe consistency)
    views: int = Field(
        2, ge=1, le=16, description="views per sample the student sees per step (consistency, full)"
    )
    teacher_online: Literal["auto", "on", "off"] = Field(
        "auto",
        description="frozen-teacher recipes: run the teacher on fresh views at every step (on) or read its "
        "outputs cached on the stored views (off); auto = on with CUDA, off on a CPU",
    )
    # devices
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    seed: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_settings(cls, data: Any) -> Any:
        """Settings renamed for readability keep working under their older short names, with a warning."""
        if isinstance(data, dict):
            for old, new in RENAMED_TRAIN_SETTINGS.items():
                if old in data:
                    if new in data:
                        raise ValueError(f"train.{old} is the old name of train.{new}: set only train.{new}")
                    warnings.warn(
                        f"params: train.{old} is deprecated, use train.{new}", FutureWarning, stacklevel=2
                    )
                    data = {**data, new: data[old]}
                    del data[old]
        return data

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
    max_params: int | None = Field(
        None,
        ge=1,
        description="deployment limit on the parameter count; null = no limit (the latency decides)",
    )
    max_latency_ms: float | None = Field(
        1.0,
        gt=0.0,
        description="deployment budget: batch-1 latency in onnxruntime on one CPU thread of the machine that runs "
        "select (1 ms = 1,000 images/s per core); null = no limit",
    )
    latency_runs: int = Field(30, ge=1, le=10_000)
    agreement_images: int = Field(
        2000,
        ge=1,
        description="without a validation split: unlabeled images on which the candidates' agreement "
        "with the teacher ranks them",
    )
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
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers, in order of preference (at least one)",
    )

    @model_validator(mode="after")
    def _check_providers(self) -> EvaluateParams:
        for name in self.providers:
            if not isinstance(name, str) or not name.endswith("ExecutionProvider"):
                raise ValueError(
                    f"evaluate.providers: {name!r} is not an onnxruntime execution provider name "
                    "(e.g. CPUExecutionProvider, CUDAExecutionProvider)"
                )
        return self

    allow_cpu_fallback: bool = False
    latency_runs: int = Field(50, ge=1, le=100_000)
    throughput_batch: int = Field(64, ge=1)


class RegisterParams(_Group):
    model_name: str = Field("kdpipe-classifier", min_length=1)
    tracking_uri: str | None = Field(
        None, description="MLflow URI; env MLFLOW_TRACKING_URI wins; default local SQLite"
    )
    experiment: str = Field("kdpipe", min_length=1)
    min_improvement: float = Field(0.0, ge=0.0, le=1.0)
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="quality gate before registering")
    promote: bool = Field(True, description="move @champion when the new version wins; false for experiments")
    new_version: bool = Field(
        True,
        description="register a model version; false (make exp): the model is logged with its MLflow run only, "
        "so experiments do not fill the registry",
    )
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

        def teacher_image_size(self, student_image_size: int | None = None) -> int:
            """The side of the images the teacher computes on: ``teacher.image_size``, else the
            student's (``student_image_size``: the prepared data's; else ``prepare.image_size``)."""
            return int(self.teacher.image_size or student_image_size or self.prepare.image_size)

        def teacher_sees_more_pixels(self) -> bool:
            """Whether the teacher's images are larger than the student's (prepare then keeps a copy
            of large images at the teacher's size)."""
            return self.teacher_image_size() > self.prepare.image_size

        @model_validator(mode="after")
        def _check_across_groups(self) -> Params:
            teacher, student = self.teacher.image_size, self.prepare.image_size
            if teacher is not None and teacher < student:
                raise ValueError(
                    f"teacher.image_size ({teacher}) is smaller than prepare.image_size ({student}): the "
                    "teacher would see fewer pixels than its student; set it at least as large (128-224 "
                    "for photos), or null for the student's size"
                )
            return self


def _fields_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, dict[str, Any]]:
    """Walk the schema along an error location; return the model holding the last key."""
    model: type[BaseModel] = Params
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
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


# Settings that were removed, with what replaces them: an old params.yaml gets this instead of "unknown".
REMOVED_KEYS = {
    (
        "data",
        "prepared",
    ): "the prepared folder is a path, not a setting: `kdpipe prepare --out-dir` writes it and "
    "every other step reads `--prepared-dir` (both default artifacts/prepared, as dvc.yaml "
    "names it); delete the line",
}


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    if err["type"] == "extra_forbidden" and loc in REMOVED_KEYS:
        return f"{source}: '{key}' was removed: {REMOVED_KEYS[loc]}"
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
        raise ParamsError(
            f"{source}: expected a mapping of step groups at the top level, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(err, source) for err in exc.errors()]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Params:
    """Read and validate params.yaml (missing file = all defaults), then apply ``key=value`` overrides."""

    # Only the implicit default may be absent; a file named on purpose (argument or env) must exist,
    # or a typo in --params would silently train with the defaults.
    explicit = path is not None or bool(os.environ.get("KDPIPE_PARAMS"))
    path = Path(path or os.environ.get("KDPIPE_PARAMS") or DEFAULT_PARAMS_FILE)
    raw: dict[str, Any] = {}
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, expected a params YAML file")
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ParamsError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        raw = parse_yaml(text, str(path))
        if raw is None:
            raise ParamsError(
                f"{path}: holds no settings (empty or only comments); write the step groups "
                "(`kdpipe params --show` prints every one with its default), or delete the file "
                "to run on the built-in defaults"
            )
    elif explicit:
        raise ParamsError(f"{path}: params file not found")
    for item in overrides or []:
        _apply_override(raw, item, str(path))
    return validate_params(raw, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML as params are written: duplicate keys are an error (YAML keeps the last one silently),
    and so are anchors and aliases (no params file needs them, and an alias "bomb" of a few hundred
    bytes expands to gigabytes). Errors name the source and the line."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _LineError(
                    event.start_mark.line + 1,
                    "YAML anchors and aliases (&name, *name) are not allowed in params; write the value out",
                )
        loader = _unique_key_loader()(text)  # a SafeLoader subclass: builds plain data only
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _LineError as exc:
        raise ParamsError(f"{source}: line {exc.line}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None


class _LineError(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


@functools.cache
def _unique_key_loader():
    """A SafeLoader that refuses a key repeated in one mapping (built once, on first use)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _LineError(
                        line,
                        f"key {key!r} appears twice (first on line {seen[key]}); YAML would "
                        "silently keep the last one",
                    )
                seen[key] = line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    if "=" not in item:
        raise ParamsError(f"override {item!r}: expected group.key=value")
    dotted, value = item.split("=", 1)
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {item!r}: '{part}' is not a group in {source}")
    node[parts[-1]] = parse_yaml(value, f"override {item!r}")


# params.yaml holds the schema's defaults (the one source) plus these settings, which suit the
# embedded demo of 28-pixel digits and nothing else: digits are not mirror-symmetric, and a pretrained
# teacher needs more pixels than the demo's 32. The README's checklist says what to set for photos;
# tests/test_params.py checks that params.yaml differs from the defaults exactly here.
DEMO_SETTINGS: dict[str, Any] = {"augment.flip": False, "teacher.image_size": 64}


# How params.yaml's comment on a demo setting starts: such a comment explains the demo's value, so
# write_overrides replaces it when the value changes.
DEMO_COMMENT = "# demo setting"


def dump_defaults() -> dict[str, Any]:
    return Params().model_dump(mode="json")


def write_overrides(path: str | os.PathLike, overrides: list[str]) -> list[str]:
    """Write ``group.key=value`` settings into a params file in place, keeping its comments and layout.

    The result is validated first (with the overrides applied), so a typo never reaches the file.
    Only ``group.key`` (two levels) is supported, which is every params.yaml setting. Returns the
    lines changed, for the caller to show."""

    path = Path(path)
    load_params(path, overrides)  # refuses unknown keys, wrong types, ranges: nothing written then
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    changed = []
    for item in overrides:
        dotted, raw = item.split("=", 1)
        group, _, key = dotted.partition(".")
        if not key or "." in key:
            raise ParamsError(f"override {item!r}: only group.key=value can be written to {path}")
        value = parse_yaml(raw, f"override {item!r}")
        changed.append(_set_line(lines, group, key, _inline_yaml(value)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return changed


def add_missing_defaults(path: str | os.PathLike) -> list[str]:
    """Add every schema group and key that a params file lacks, at its default with the field's
    description as a comment, keeping the rest of the file as it is: a setting new in the schema
    reaches params.yaml by ``kdpipe params --add-missing``. Returns the lines added."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    present = yaml.safe_load(text) or {}
    lines = text.splitlines()
    added = []
    for group, values in dump_defaults().items():
        for key, value in values.items():
            if key not in (present.get(group) or {}):
                description = Params.model_fields[group].annotation.model_fields[key].description or ""
                added.append(_set_line(lines, group, key, _inline_yaml(value), comment=description))
    if added:
        validate_params(yaml.safe_load("\n".join(lines)), str(path))  # the file still validates
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return added


def _inline_yaml(value: Any) -> str:
    """``value`` as YAML on one line (what follows ``key:``)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("...").strip()


def _set_line(lines: list[str], group: str, key: str, value: str, comment: str = "") -> str:
    """Replace ``key``'s value inside ``group:`` (its inline comment kept), or add the key (or group,
    with ``comment`` after a new key)."""
    start = next((i for i, line in enumerate(lines) if line.rstrip() == f"{group}:"), None)
    new_line = f"  {key}: {value}".ljust(28) + f" # {comment}" if comment else f"  {key}: {value}"
    if start is None:
        lines += ["", f"{group}:", new_line]
        return f"{group}.{key}: {value}"
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i] and not lines[i][0].isspace() and not lines[i].startswith("#")
        ),
        len(lines),
    )
    for i in range(start + 1, end):
        stripped = lines[i].lstrip()
        if stripped.startswith(f"{key}:"):
            indent = lines[i][: len(lines[i]) - len(stripped)]
            column = lines[i].find(" #", len(indent) + len(key) + 1)
            new = f"{indent}{key}: {value}"
            if column >= 0:  # keep the inline comment, at its column when the new value fits before it
                comment = lines[i][column:].lstrip()
                old_value = lines[i][len(indent) + len(key) + 1 : column].strip()
                if comment.startswith(DEMO_COMMENT) and old_value != value:
                    # it explained the demo's value, which is gone: it would now describe the wrong one
                    comment = f"# set for this project (the demo's value was {old_value})"
                new = new.ljust(column) + " " + comment if len(new) < column else f"{new}  {comment}"
            lines[i] = new
            return f"{group}.{key}: {value}"
    insert = end
    while insert > start + 1 and not lines[insert - 1].strip():
        insert -= 1
    lines.insert(insert, new_line)
    return f"{group}.{key}: {value}"
