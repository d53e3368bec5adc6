"""The augment step: streamed views, a skip for recipes that make their views online, settings that
only change the preview, and views refused when they were made from other data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdpipe.core.errors import IntegrityError, KdpipeError
from kdpipe.data.augmented import load_views
from kdpipe.steps import augment as augment_step
from kdpipe.steps import distill
from kdpipe.steps.common import training_data
from kdpipe.training.augmentation import AugmentConfig, augment, make_generator
from kdpipe.training.views import to_nchw


def run_augment(params, dirs, out, **train):
    threads = torch.get_num_threads()
    try:
        return augment_step.run(
            params.model_copy(update={"train": params.train.model_copy(update=train)}),
            dirs["prepared"],
            out,
            dirs["teacher"],
        )
    finally:
        torch.set_num_threads(threads)


def test_views_are_streamed_chunk_by_chunk_into_the_same_arrays_as_in_memory(
    tiny_pipeline_dirs, tmp_path, monkeypatch
):
    """Written a few samples at a time, the stored views are exactly what augmenting the whole set in
    memory with the same generator sequence gives (the reference below keeps everything in RAM)."""
    d = tiny_pipeline_dirs
    monkeypatch.setattr(augment_step, "CHUNK", 7)  # several chunks, the last one partial
    run_augment(d["params"], d, tmp_path / "aug", recipe="kd")
    stored = load_views(tmp_path / "aug")

    from kdpipe.data.prepared import load_prepared

    data = load_prepared(d["prepared"])
    ap = d["params"].augment
    kinds = augment_step.view_kinds(ap.views, ap.p)
    cfg, gen = AugmentConfig.from_params(ap), make_generator(ap.seed)
    for images, views in ((data.train_x, stored.labeled_views), (data.unlabeled_x, stored.unlabeled_views)):
        expected = np.empty((len(images), len(kinds), *images.shape[1:]), dtype=np.uint8)
        for start in range(0, len(images), 7):
            chunk = to_nchw(images[start : start + 7])
            for k, kind in enumerate(kinds):
                view = augment(chunk, gen, 1.0 if kind == "strong" else 0.0, cfg)
                expected[start : start + 7, k] = (
                    view.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                )
        assert np.array_equal(views, expected)


def test_recipes_with_a_trained_teacher_store_nothing(tiny_pipeline_dirs, tmp_path, capsys):
    d = tiny_pipeline_dirs
    policy = run_augment(d["params"], d, tmp_path / "aug", recipe="cotrain")
    assert policy["skipped_for_recipe"] == "cotrain"
    assert sorted(p.name for p in (tmp_path / "aug").iterdir()) == ["policy.json", "preview.png"]
    assert "builds its views during training" in capsys.readouterr().out
    # a frozen-teacher recipe given these sets is told what to do
    with pytest.raises(KdpipeError, match="ran for recipe 'cotrain'.*run `kdpipe augment` with the recipe"):
        load_views(tmp_path / "aug")


def test_preview_settings_do_not_change_what_distill_depends_on(tiny_pipeline_dirs, tmp_path):
    d = tiny_pipeline_dirs
    params = d["params"]
    other = params.model_copy(
        update={
            "augment": params.augment.model_copy(
                update={"preview_samples": params.augment.preview_samples + 3}
            )
        }
    )
    run_augment(params, d, tmp_path / "a", recipe="kd")
    run_augment(other, d, tmp_path / "b", recipe="kd")
    assert (tmp_path / "a" / "policy.json").read_bytes() == (tmp_path / "b" / "policy.json").read_bytes()
    assert (tmp_path / "a" / "preview.png").read_bytes() != (tmp_path / "b" / "preview.png").read_bytes()

    from kdpipe.steps.distill import _fingerprint

    assert _fingerprint(params, d["prepared"], d["teacher"]) == _fingerprint(
        other, d["prepared"], d["teacher"]
    )


def test_views_made_from_other_data_are_refused(tiny_pipeline_dirs, tmp_path):
    """A manual run pairing a prepared set with views made from another one must not train."""
    import shutil

    d = tiny_pipeline_dirs
    augmented = tmp_path / "augmented"
    shutil.copytree(d["augmented"], augmented)
    policy = json.loads((augmented / "policy.json").read_text())
    policy["data_version"] = "0" * 64
    (augmented / "policy.json").write_text(json.dumps(policy))
    with pytest.raises(IntegrityError, match="made from another prepared data set"):
        training_data(d["prepared"], augmented)


def test_float16_logits_are_the_float32_ones_rounded(tiny_pipeline_dirs, tmp_path):
    """augment.logits_dtype float16 (the default) stores the same logits rounded to half precision:
    half the disk for the many stored views fresh-view distillation wants."""
    d = tiny_pipeline_dirs
    half = d["params"].model_copy(
        update={"augment": d["params"].augment.model_copy(update={"logits_dtype": "float16"})}
    )
    run_augment(half, d, tmp_path / "half", recipe="kd")
    full = load_views(d["augmented"])  # the session's float32 cache, same seeds and teacher
    stored = load_views(tmp_path / "half")
    assert stored.labeled_logits.dtype == np.float16 and full.labeled_logits.dtype == np.float32
    for small, big in (
        (stored.labeled_logits, full.labeled_logits),
        (stored.unlabeled_logits, full.unlabeled_logits),
    ):
        assert np.array_equal(small, np.asarray(big).astype(np.float16))
    assert stored.labeled_logits.nbytes * 2 == full.labeled_logits.nbytes
    # training reads them as float32 on the device
    trainer = distill.build_trainer(
        half.model_copy(update={"train": half.train.model_copy(update={"recipe": "kd"})}),
        d["prepared"],
        tmp_path / "half",
        d["teacher"],
        tmp_path / "out",
        progress=False,
    )
    batch = trainer.views.next(np.arange(3), np.arange(2))
    assert batch.teacher_logits[0].dtype == torch.float32
