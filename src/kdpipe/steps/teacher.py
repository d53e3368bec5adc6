"""The ``teacher`` step: train the teacher supervised on the labeled data, or adopt a given one.

With ``teacher.checkpoint`` set, the checkpoint is loaded (``weights_only=True``), checked against
the data's classes and image size, evaluated on the validation split and copied as ``teacher.pt``;
no training happens. Otherwise the teacher architecture is trained with the ``supervised`` recipe
through the same engine as every other recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import checkpoints
from ..atomic import write_json
from ..errors import KdpipeError
from ..layout import PREPARED, TEACHER


def _adopt(params, data, out: Path, runtime) -> dict:
    from ..engine import accuracy, predict_logits

    path = params.teacher.checkpoint
    model, ckpt = checkpoints.load_model(path)
    if list(ckpt.get("class_names") or data.class_names) != data.class_names:
        raise KdpipeError(f"{path}: teacher classes {ckpt.get('class_names')} differ from the data's {data.class_names}")
    if ckpt["num_classes"] != len(data.class_names):
        raise KdpipeError(f"{path}: teacher has {ckpt['num_classes']} classes, the data {len(data.class_names)}")
    acc = accuracy(predict_logits(model.to(runtime.device), data.val_x, runtime), data.val_y)
    ckpt["meta"] = {**ckpt.get("meta", {}), "val_accuracy": acc, "role": "teacher", "source": "teacher.checkpoint"}
    ckpt["class_names"] = data.class_names
    checkpoints.save(ckpt, out / "teacher.pt")
    summary = {"trained": False, "source": str(path), "val_accuracy": acc}
    write_json(out / "metrics.json", summary)
    write_json(out / "history.json", [{"iteration": 0, "val_acc_student": acc}])
    return summary


def run(params, prepared_dir: str | os.PathLike = PREPARED, out_dir: str | os.PathLike = TEACHER) -> dict:
    from ..augmentation import AugmentConfig
    from ..devices import runtime_from_params
    from ..engine import LoopConfig, Trainer
    from ..recipes import Hyper, build_recipe
    from .common import training_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = runtime_from_params(params.train)
    data = training_data(prepared_dir)
    if params.teacher.checkpoint:
        return _adopt(params, data, out, runtime)
    tp = params.teacher
    trainer = Trainer(
        build_recipe("supervised"), data, LoopConfig.from_teacher(tp), Hyper(), runtime, out,
        student_arch=tp.arch, student_weights=tp.weights, augment_cfg=AugmentConfig.from_params(params.augment),
        best_names={"student": "teacher.pt"}, desc="teacher",
        run_fingerprint={"step": "teacher", "teacher": tp.model_dump(), "augment": params.augment.model_dump(),
                         "data_version": _data_version(prepared_dir)},
    )
    summary = trainer.run()
    trainer.write_reports()
    result = {"trained": True, "arch": tp.arch, "val_accuracy": summary["best_student"]["accuracy"],
              "iterations": summary["iterations"], "train_seconds": summary["train_seconds"]}
    if runtime.is_main:
        write_json(out / "metrics.json", result)
    return result


def _data_version(prepared_dir) -> str:
    from ..atomic import read_json

    return read_json(Path(prepared_dir) / "manifest.json")["data_version"]
