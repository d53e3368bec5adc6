"""Shared pytest fixtures. Every image is generated in tmp_path: no binary test data is checked in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _no_step_tracking(monkeypatch):
    """CLI steps log to MLflow by default; tests opt in explicitly (with a store in tmp_path) so
    no test writes an mlflow.db into the working tree."""
    monkeypatch.setenv("KDPIPE_TRACKING", "0")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    """kdpipe's cache folder (integrity stamps) inside pytest's temporary folder, never the user's."""
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kdpipe-cache"))
    monkeypatch.delenv("KDPIPE_VERIFY", raising=False)


def _noise_rgb(size: tuple[int, int], seed: int) -> np.ndarray:
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def make_image():
    """Factory: ``make_image(path, size=(12, 12), seed=0, mode="RGB", **save_kwargs) -> Path``.

    Writes random-noise pixels (distinct per seed) converted to ``mode``; the format follows the
    file extension. Parent folders are created.
    """
    from PIL import Image

    def make(path, size=(12, 12), seed=0, mode="RGB", **save_kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_noise_rgb(size, seed))
        if mode != "RGB":
            img = img.convert(mode)
        img.save(path, **save_kwargs)
        return path

    return make


@pytest.fixture
def image_dataset(tmp_path, make_image):
    """Factory building a small valid data root; returns its path.

    ``image_dataset(classes={"cat": 5, "dog": 5}, unlabeled=4, test={"cat": 2, "dog": 2})``.
    Every image is distinct; unlabeled images go in ``unlabeled/batch-0001/``.
    """

    def build(classes=None, unlabeled=4, test=None, root=None, size=12) -> Path:
        root = Path(root or tmp_path / "data")
        classes = {"cat": 5, "dog": 5} if classes is None else classes
        test = {"cat": 2, "dog": 2} if test is None else test
        seed = 1000
        for split, counts in (("labeled", classes), ("test", test)):
            for name, n in counts.items():
                for k in range(n):
                    seed += 1
                    make_image(root / split / name / f"{name}_{k:03d}.png", size=(size, size), seed=seed)
        for k in range(unlabeled):
            seed += 1
            make_image(root / "unlabeled" / "batch-0001" / f"u_{k:03d}.png", size=(size, size), seed=seed)
        return root

    return build


# ------------------------------------------------------------------------------------------
# A tiny, learnable pipeline shared by the engine / recipe / resume / DDP tests.

TINY_CLASSES = ("blue", "green", "red")


def _class_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy image whose dominant colour channel and stripe orientation follow the class."""
    img = rng.integers(0, 90, size=(size, size, 3)).astype(np.int16)
    channel = 2 - label  # blue -> 2, green -> 1, red -> 0 (class names are sorted by prepare)
    img[..., channel] += 45
    stripes = np.zeros((size, size), dtype=np.int16)
    if label == 0:
        stripes[::4, :] = 25
    elif label == 1:
        stripes[:, ::4] = 25
    else:
        stripes[np.eye(size, dtype=bool)] = 25
    img += stripes[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiny_dataset(
    root: Path,
    labeled_per_class: int = 14,
    unlabeled: int = 60,
    test_per_class: int = 2,
    size: int = 16,
    seed: int = 0,
) -> Path:
    """labeled/<class>/, unlabeled/, test/<class>/ of real PNG files with class-dependent patterns."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, per_class in (("labeled", labeled_per_class), ("test", test_per_class)):
        for label, name in enumerate(TINY_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(_class_image(label, rng, size)).save(folder / f"{name}_{k:03d}.png")
    folder = root / "unlabeled" / "batch-0001"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(unlabeled):
        Image.fromarray(_class_image(k % len(TINY_CLASSES), rng, size)).save(folder / f"u_{k:03d}.png")
    return root


def keep_threads(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with torch's thread count put back afterwards (steps set train.threads)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def tiny_params(**train_overrides):
    """Params with settings small enough for a few seconds of CPU training."""
    from kdpipe.core.params import validate_params

    train = {
        "recipe": "cotrain",
        "student_arch": "cnn_tiny",
        "batch_size": 8,
        "mu": 1.0,
        "lr": 0.05,
        "max_iterations": 20,
        "epoch_iterations": 5,
        "eval_every": 5,
        "checkpoint_every": 5,
        "views": 2,
        "device": "cpu",
        "amp": "off",
        "channels_last": "off",
        "threads": 1,
        "seed": 0,
    }
    train.update(train_overrides)
    return validate_params(
        {
            "prepare": {"image_size": 16, "val_fraction": 0.2},
            # torch computes the cached teacher logits here, so the cache equals running the teacher bit for bit
            "augment": {
                "views": 2,
                "preview_samples": 2,
                "pad": 2,
                "teacher_inference": "torch",
                "logits_dtype": "float32",
            },
            "teacher": {
                "arch": "cnn_tiny",
                "weights": None,
                "max_iterations": 20,
                "batch_size": 8,
                "eval_every": 10,
                "lr": 0.05,
                "backbone_lr_scale": 1.0,
                "freeze_batchnorm": False,
            },
            "train": train,
        }
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dirs(tmp_path_factory):
    """prepare + teacher + augment run ONCE per session on a tiny data set.

    Returns a dict: ``root`` (the tmp folder), ``data``, ``prepared``, ``augmented``, ``teacher``
    (paths) and ``params`` (the tiny :class:`kdpipe.core.params.Params`, recipe ``cotrain``).
    Tests must not write into these folders; they get their own ``out_dir``.
    """
    import torch

    from kdpipe.steps import augment, prepare, teacher

    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("tiny_pipeline")
    params = tiny_params()
    dirs = {
        "root": base,
        "data": base / "data",
        "prepared": base / "prepared",
        "augmented": base / "augmented",
        "teacher": base / "teacher",
    }
    write_tiny_dataset(dirs["data"])
    try:
        prepare.run(params, dirs["data"], dirs["prepared"])
        teacher.run(params, dirs["prepared"], dirs["teacher"])
        # stored views for the tests of frozen-teacher recipes (for cotrain itself augment stores none)
        augment.run(tiny_params(recipe="kd"), dirs["prepared"], dirs["augmented"], dirs["teacher"])
    finally:
        torch.set_num_threads(threads)  # train.threads=1 must not leak into unrelated tests
    return {**dirs, "params": params}


@pytest.fixture(scope="session")
def tiny_params_factory():
    """``tiny_params_factory(**train_overrides) -> Params`` (the tiny settings of ``tiny_pipeline_dirs``)."""
    return tiny_params


@pytest.fixture(scope="session")
def run_distill(tiny_pipeline_dirs):
    """Factory: ``run_distill(out_dir, **train_overrides) -> summary`` runs the distill step in-process
    on the tiny pipeline (torch's thread count is restored afterwards)."""
    import torch

    from kdpipe.steps import distill

    def run(out_dir, **train_overrides):
        threads = torch.get_num_threads()
        d = tiny_pipeline_dirs
        try:
            return distill.run(
                tiny_params(**train_overrides), d["prepared"], d["augmented"], d["teacher"], out_dir
            )
        finally:
            torch.set_num_threads(threads)

    return run


def without_read_anything_capabilities() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set,
    so that even root obeys file modes (as a normal user always does). prctl(PR_CAPBSET_DROP)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if os.geteuid() == 0 and libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def pytest_collection_modifyitems(config, items):
    """Image builds take minutes: they run only when asked for (`-m image`, `make test-image`)."""
    if "image" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="builds a container image (minutes): run `make test-image`")
    for item in items:
        if "image" in item.keywords:
            item.add_marker(skip)
