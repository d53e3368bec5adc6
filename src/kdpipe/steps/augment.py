"""The ``augment`` step: K stored views of every training image, with the frozen teacher's outputs on them.

For every labeled training and unlabeled sample it stores K seeded views, weak or weak + strong
(``augment.p`` is the share of strong ones), as uint8 arrays the trainer memory-maps, and, with a
teacher checkpoint and ``augment.teacher_logits``, the teacher's logits on every view. Outputs:
``labeled_views.npy``, ``unlabeled_views.npy``, ``labeled_logits.npy``, ``unlabeled_logits.npy``,
``policy.json``, ``preview.png``. For recipes whose teacher is trained in the run it writes only
``policy.json`` and the preview.

Design notes: docs/design-notes.md.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.core.atomic import allocated_memmap, atomic_dir, write_json
from kdpipe.core.files import file_sha256
from kdpipe.core.layout import AUGMENTED, PREPARED, TEACHER
from kdpipe.core.progress import Progress
from kdpipe.data.augmented import LOGIT_FILES, PRESENTATION_ONLY, VIEW_FILES
from kdpipe.data.integrity import record_verified
from kdpipe.data.mapped import release
from kdpipe.data.prepared import load_prepared

CHUNK = 512  # images augmented per call: bounded memory for large pools


def view_kinds(views: int, p: float) -> list[str]:
    """``["weak", ..., "strong", ...]``: ``round(p * views)`` strong views, the weak ones first."""
    strong = int(p * views + 0.5)
    return ["weak"] * (views - strong) + ["strong"] * strong


ONNX_OPSET = 17  # for the teacher's temporary inference graph (TorchScript exporter)
PARITY_MAX_ABS = 1e-3  # onnxruntime must match torch this closely, or the teacher runs in torch


@dataclass
class _Teacher:
    """The frozen teacher, and how its logits are computed: torch, or onnxruntime on the CPU, where it
    runs EfficientNet-style networks 3.5-5x faster than torch eager (BENCHMARKS.md)."""

    model: object
    runtime: object
    sha256: str
    meta: dict
    session: object = None  # onnxruntime session, when used

    def logits(self, x) -> np.ndarray:
        import torch

        if self.session is not None:
            return self.session.run(None, {self.session.get_inputs()[0].name: x.cpu().numpy()})[0]
        with torch.no_grad(), self.runtime.autocast():
            return self.model(x.to(self.runtime.device)).float().cpu().numpy()


def _load_teacher(teacher_dir, params) -> _Teacher | None:
    from kdpipe.training import checkpoints
    from kdpipe.training.devices import runtime_from_params

    path = Path(teacher_dir) / "teacher.pt" if teacher_dir is not None else None
    if path is None or not path.is_file() or not params.augment.teacher_logits:
        return None
    model, ckpt = checkpoints.load_model(path)
    runtime = runtime_from_params(params.train)
    model = model.to(runtime.device).eval()
    meta = {
        "arch": ckpt["arch"],
        "input_size": ckpt.get("input_size"),
        "path": str(path),
        "inference": "torch",
    }
    return _Teacher(model, runtime, file_sha256(path), meta)


def _use_onnxruntime(teacher: _Teacher, choice: str, view_size: int, workdir: Path, probe) -> None:
    """Switch the teacher to onnxruntime when asked (``auto``: on a CPU device), after a parity check
    against torch on real views; a failed check keeps torch and says so."""
    import torch

    from kdpipe.export.onnx import CPU, export_onnx, make_session

    if choice == "torch" or (choice == "auto" and teacher.runtime.device.type != "cpu"):
        return
    onnx_path = export_onnx(teacher.model.cpu(), workdir / "teacher.onnx", view_size, ONNX_OPSET)
    teacher.model.to(teacher.runtime.device)
    session = make_session(onnx_path, [CPU], threads=torch.get_num_threads())
    reference = teacher.logits(probe)
    teacher.session = session
    gap = float(np.abs(teacher.logits(probe) - reference).max()) if len(probe) else 0.0
    if not gap <= PARITY_MAX_ABS:
        teacher.session = None
        print(f"augment: onnxruntime differs from torch by {gap:.2g} on the teacher's logits; using torch")
        return
    teacher.meta.update(inference="onnxruntime", parity_max_abs=gap)


def _write_sets(
    images: np.ndarray,
    small_size: int,
    kinds: list[str],
    cfg,
    gen,
    teacher: _Teacher | None,
    views_path: Path,
    logits_path: Path,
    num_classes: int,
    desc: str,
    device,
    logits_dtype: str = "float16",
) -> None:
    """Augment ``images`` chunk by chunk on ``device`` into ``views_path`` (and the teacher's logits into
    ``logits_path``): memory holds one chunk, whatever the number of images."""
    import torch

    from kdpipe.training.augmentation import augment
    from kdpipe.training.views import shrink, to_nchw

    n, k = len(images), len(kinds)
    if n == 0:  # np.memmap cannot map a zero-length array
        np.save(views_path, np.zeros((0, k, small_size, small_size, 3), dtype=np.uint8))
        if teacher is not None:
            np.save(logits_path, np.zeros((0, k, num_classes), dtype=logits_dtype))
        return
    views_out = allocated_memmap(views_path, np.uint8, (n, k, small_size, small_size, 3))
    logits_out = None
    if teacher is not None:
        # float16 halves the cache: logits need about 3 significant digits (a KD loss at tau >= 1 does
        # not see the rest), and many stored views are what fresh-view distillation needs on a CPU
        logits_out = allocated_memmap(logits_path, np.dtype(logits_dtype), (n, k, num_classes))
    bar = Progress(n, desc)
    for start in range(0, n, CHUNK):
        chunk = to_nchw(images[start : start + CHUNK]).to(device)
        for view, kind in enumerate(kinds):
            big = augment(chunk, gen, 1.0 if kind == "strong" else 0.0, cfg)
            small_u8 = shrink(big, small_size).mul(255).round().clamp(0, 255).to(torch.uint8)
            views_out[start : start + len(chunk), view] = small_u8.permute(0, 2, 3, 1).cpu().numpy()
            if logits_out is not None:
                # The teacher reads the view it is given: the stored uint8 view itself, or (with a
                # teacher-resolution copy) the same view before it was shrunk for the student.
                x = big if big.shape[-1] != small_size else small_u8.float().div_(255.0)
                logits_out[start : start + len(chunk), view] = teacher.logits(x)
        # the pages this chunk read and wrote are in the page cache (written ones go to disk as
        # usual): keeping them mapped would make the resident set grow with N (see mapped.py)
        release(images, views_out, logits_out)
        bar.update(len(chunk))
    bar.close()
    views_out.flush()
    if logits_out is not None:
        logits_out.flush()


def contact_sheet(originals: np.ndarray, views: np.ndarray, path: Path, scale: int = 3) -> None:
    """One row per sample: the original, then its K views, with a 2-pixel white gutter."""
    from PIL import Image

    n, k = views.shape[:2]
    size = originals.shape[1]
    cell = size * scale + 2
    sheet = Image.new("RGB", (cell * (k + 1), max(1, cell * n)), "white")
    for row in range(n):
        for col, image in enumerate([originals[row], *views[row]]):
            tile = Image.fromarray(image).resize((size * scale, size * scale), Image.Resampling.NEAREST)
            sheet.paste(tile, (col * cell + 1, row * cell + 1))
    sheet.save(path, format="PNG")


# Settings that change only what is shown (the contact sheet), never the stored views: they are left
# out of policy.json and of distill's resume fingerprint and DVC dependencies, so changing them
# never retrains anything.


def stored_views_needed(params) -> bool:
    """Does the recipe to train read stored views? (Those with a trained teacher build them online.)"""
    from kdpipe.training.recipes import recipe_for

    return recipe_for(params.train).reads_stored_views


def run(
    params,
    prepared_dir: str | os.PathLike = PREPARED,
    out_dir: str | os.PathLike = AUGMENTED,
    teacher_dir: str | os.PathLike | None = TEACHER,
) -> dict:
    from kdpipe.training.augmentation import OPS, AugmentConfig, make_generator
    from kdpipe.training.devices import runtime_from_params
    from kdpipe.training.views import scaled_config, to_nchw

    ap = params.augment
    data = load_prepared(prepared_dir, splits=("train", "unlabeled"))
    if not stored_views_needed(params):
        return _skip(params, data, out_dir)
    teacher = _load_teacher(teacher_dir, params)
    device = runtime_from_params(params.train).device
    kinds = view_kinds(ap.views, ap.p)
    cfg = AugmentConfig.from_params(ap)
    gen = make_generator(ap.seed, device)
    # With a teacher-resolution copy (and a teacher to read it) views are made at that resolution.
    big = teacher is not None and data.train_xt is not None
    labeled, unlabeled = (data.train_xt, data.unlabeled_xt) if big else (data.train_x, data.unlabeled_x)
    if ap.max_unlabeled:
        unlabeled = unlabeled[: ap.max_unlabeled]
    work_cfg = scaled_config(cfg, data.image_size, labeled.shape[1])
    with atomic_dir(out_dir) as tmp:
        if teacher is not None:
            with tempfile.TemporaryDirectory(prefix="kdpipe-teacher-") as workdir:
                probe = to_nchw(np.asarray(labeled[:32])).float().div_(255.0)
                _use_onnxruntime(teacher, ap.teacher_inference, int(labeled.shape[1]), Path(workdir), probe)
        for images, role in ((labeled, "labeled"), (unlabeled, "unlabeled")):
            _write_sets(
                images,
                data.image_size,
                kinds,
                work_cfg,
                gen,
                teacher,
                tmp / f"{role}_views.npy",
                tmp / f"{role}_logits.npy",
                data.num_classes,
                f"augment {role}",
                device,
                ap.logits_dtype,
            )
        labeled_views = np.load(tmp / VIEW_FILES[0], mmap_mode="r")
        shown = min(ap.preview_samples, len(labeled_views))
        if shown:
            contact_sheet(
                np.asarray(data.train_x[:shown]), np.asarray(labeled_views[:shown]), tmp / "preview.png"
            )
        files = VIEW_FILES + (LOGIT_FILES if teacher is not None else ())
        policy = {
            **ap.model_dump(exclude=PRESENTATION_ONLY),
            "view_kinds": kinds,
            "ops": list(OPS),
            "weak": {"pad": cfg.pad, "flip": cfg.flip, "crop": "random crop with reflect padding"},
            "strong": {
                "num_ops": cfg.num_ops,
                "magnitude": cfg.magnitude,
                "erase_prob": cfg.erase_prob,
                "views": kinds.count("strong"),
            },
            "made_at": int(labeled.shape[1]),
            "counts": {"labeled": int(len(labeled)), "unlabeled": int(len(unlabeled))},
            "data_version": data.manifest["data_version"],
            "teacher": None if teacher is None else {**teacher.meta, "sha256": teacher.sha256},
            "files": {name: file_sha256(tmp / name) for name in files},
        }
        del labeled_views
        write_json(tmp / "policy.json", policy)
    record_verified(out_dir, policy["files"])  # just hashed: distill need not read them again
    cached = "with the teacher's logits" if teacher is not None else "without teacher logits (no teacher.pt)"
    print(
        f"augment: {len(labeled)} labeled and {len(unlabeled)} unlabeled samples x {ap.views} views "
        f"({kinds.count('strong')} strong) {cached} -> {out_dir}"
    )
    return policy


def _skip(params, data, out_dir: str | os.PathLike) -> dict:
    """Nothing to store for a recipe that builds its views during training: write only the policy
    (which says so) and a preview of the policy's views, in seconds instead of a pass over the data."""
    from kdpipe.training.augmentation import AugmentConfig, make_generator

    ap = params.augment
    recipe = params.train.recipe
    policy = {
        **ap.model_dump(exclude=PRESENTATION_ONLY),
        "skipped_for_recipe": recipe,
        "data_version": data.manifest["data_version"],
        "files": {},
    }
    with atomic_dir(out_dir) as tmp:
        shown = min(ap.preview_samples, len(data.train_x))
        if shown:
            originals = np.asarray(data.train_x[:shown])
            previews = _preview_views(
                originals, view_kinds(ap.views, ap.p), AugmentConfig.from_params(ap), make_generator(ap.seed)
            )
            contact_sheet(originals, previews, tmp / "preview.png")
        write_json(tmp / "policy.json", policy)
    print(f"augment: recipe '{recipe}' builds its views during training; no views stored -> {out_dir}")
    return policy


def _preview_views(originals: np.ndarray, kinds: list[str], cfg, gen) -> np.ndarray:
    """``(n, K, S, S, 3)`` uint8: each original augmented once per view kind, for the contact sheet."""
    import torch

    from kdpipe.training.augmentation import augment
    from kdpipe.training.views import to_nchw

    x = to_nchw(originals)
    views = [
        augment(x, gen, 1.0 if kind == "strong" else 0.0, cfg).mul(255).round().clamp(0, 255).to(torch.uint8)
        for kind in kinds
    ]
    return torch.stack(views, dim=1).permute(0, 1, 3, 4, 2).numpy()
