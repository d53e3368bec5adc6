"""Few labels: what keeping a validation split costs, against training on every label.

For 10, 20 and 100 labeled photos per class, the teacher step runs twice on the same labels:

* ``holdout`` -- README's old advice: ``prepare.val_fraction`` of the labels (half of them at 10 and 20
  per class, a fifth at 100) held out for validation; the teacher trains on the rest and is judged
  on them;
* ``every label`` -- ``prepare.val_fraction: 0``: the teacher trains on all of them and is judged by
  ``teacher.folds``-fold cross-validation (each fold one more fine-tuning).

Both are scored on the same test photos, with their wall time. The photos are CIFAR-10 images of 5
classes (``../shared/data/cifar10_subset.npz``, see its README) upsampled to the teacher's 128 px, as
in ``benchmarks/first_day.py``.

    .venv/bin/python -m benchmarks.few_labels          # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    load_npz,
    markdown_table,
    provenance,
    test_accuracy,
    write_prepared,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_subset.npz"
CLASSES = (0, 1, 2, 3, 8)  # airplane, automobile, bird, cat, ship: the first-day photo classes
HOLDOUT = {10: 0.5, 20: 0.5, 100: 0.2}  # validation share a user keeps to get a usable split


def _prepared(work: Path, data: dict, per_class: int, val_share: float, seed: int) -> Path:
    """A prepared folder: ``per_class`` labels per class, ``val_share`` of them for validation (0: none)."""
    rng = np.random.default_rng(seed)
    remap = {c: k for k, c in enumerate(CLASSES)}
    train, val = [], []
    for c in CLASSES:
        chosen = rng.permutation(np.flatnonzero(data["y_train"] == c))[:per_class]
        held = int(round(per_class * val_share))
        val += list(chosen[:held])
        train += list(chosen[held:])
    test = np.flatnonzero(np.isin(data["y_test"], CLASSES))

    def labels(y):
        return np.array([remap[int(v)] for v in y], dtype=np.int64)

    out = work / f"{per_class}_{val_share:g}"
    x, y = data["x_train"], data["y_train"]
    write_prepared(
        out,
        x[train],
        labels(y[train]),
        x[val],
        labels(y[val]),
        x[:0],
        data["x_test"][test],
        labels(data["y_test"][test]),
        [data["class_names"][c] for c in CLASSES],
    )
    return out


def run_case(work: Path, data: dict, per_class: int, val_share: float, seed: int, folds: int, log) -> dict:
    from kdpipe.core.params import validate_params
    from kdpipe.steps import teacher
    from kdpipe.training.devices import make_runtime

    prepared = _prepared(work, data, per_class, val_share, seed)
    params = validate_params(
        {
            "augment": {"flip": True},
            "teacher": {
                "image_size": 128,
                "seed": seed,
                "folds": folds,
                "max_iterations": 1000,
                "student_check_iterations": 0,
            },
            "train": {"device": "cpu"},
        }
    )
    started = time.perf_counter()
    result = teacher.run(params, prepared, prepared.parent / f"{prepared.name}_teacher")
    wall = time.perf_counter() - started
    runtime = make_runtime("cpu", "off", "off", torch.get_num_threads())
    checkpoint = prepared.parent / f"{prepared.name}_teacher" / "teacher.pt"
    remap = {c: k for k, c in enumerate(CLASSES)}
    test = np.flatnonzero(np.isin(data["y_test"], CLASSES))
    accuracy = test_accuracy(
        checkpoint,
        data["x_test"][test],
        np.array([remap[int(v)] for v in data["y_test"][test]]),
        runtime,
        onnxruntime=True,
    )
    row = {
        "labels_per_class": per_class,
        "way": "every label" if val_share == 0 else "holdout",
        "trained_on": per_class - int(round(per_class * val_share)),
        "validation": int(round(per_class * val_share)),
        "kept": result["kept"],
        "estimated_by": result["estimated_by"],
        "estimate": result["val_accuracy"],
        "test_accuracy": accuracy,
        "wall_s": round(wall, 1),
        "seed": seed,
    }
    log(f"{per_class}/class {row['way']}: test {accuracy:.3f}, kept {row['kept']}, {row['wall_s']} s")
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        [
            str(r["labels_per_class"]),
            r["way"],
            f"{r['trained_on']} / {r['validation']}",
            r["kept"],
            r["estimated_by"],
            "–" if r["estimate"] is None else f"{100 * r['estimate']:.1f}%",
            f"{100 * r['test_accuracy']:.1f}%",
            f"{r['wall_s']:.0f}",
        ]
        for r in rows
    ]
    header = [
        "labels per class",
        "way",
        "per class: train / validation",
        "teacher kept",
        "judged by",
        "its estimate",
        "test accuracy",
        "wall s",
    ]
    return "\n".join(
        [
            "# Few labels: a validation split against every label training",
            "",
            f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['date']}; {meta['cpu']}).",
            "",
            markdown_table(header, lines),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--per-class", type=int, nargs="+", default=[10, 20, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/few_labels")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        print(
            f"few_labels: {args.data} is missing (the CIFAR-10 subset lives in ../shared/data/)",
            file=sys.stderr,
        )
        return 2
    torch.set_num_threads(args.threads)
    data = load_npz(args.data)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-few-labels-") as tmp:
        for per_class in args.per_class:
            for share in (HOLDOUT.get(per_class, 0.2), 0.0):
                rows.append(run_case(Path(tmp), data, per_class, share, args.seed, args.folds, log))
    meta = provenance("benchmarks.few_labels", argv)
    write_results(
        args.out, {**meta, "rows": rows, "total_wall_s": round(time.time() - started, 1)}, render(rows, meta)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
