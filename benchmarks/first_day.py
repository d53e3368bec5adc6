"""A new user's first day, run for real: the README's "Bring your own data" checklist on photo files.

What it does, in a fresh clone of the committed HEAD (in a temporary folder, or --workdir):

1. writes a folder of real photos in the README's layout: CIFAR-10 images from
   ../shared/data/cifar10_subset.npz (see its README for the source and citation), upscaled to
   128 px and saved as JPEG files, as a user's downsized photos would be; a few real-life problems
   are planted on purpose (the same photo filed under two classes, an unlabeled photo that is also a
   test photo, a truncated JPEG, a stray text file);
2. follows the checklist step by step, with the README's own commands: drop the demo data,
   ``kdpipe prepare --check``, ``dvc add``, ``make repro S="..."``;
3. runs one experiment with ``make exp`` (the supervised recipe, for comparison) and checks that it
   left params.yaml and the registry's @champion alias alone;
4. writes what each command printed (trimmed) and the measured figures to docs/first-day.md and
   benchmarks/results/first_day.json.

The fresh clone reuses this checkout's .venv (a symlink) so that no 5 GB of wheels are installed
again; everything else (DVC init, MLflow store, remote) is created by the Makefile as on any clone.

    .venv/bin/python -m benchmarks.first_day            # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import cpu_description, load_npz

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_subset.npz"
CLASSES = ("airplane", "automobile", "bird", "cat", "ship")
PHOTO_SIZE = 128
# The settings the checklist tells a photo user to choose (README, "Bring your own data", step 3): with
# 20 labels per class, no validation split -- every label trains (README, "Few labels").
SETTINGS = (
    "prepare.image_size=64",
    "teacher.image_size=128",
    "augment.flip=true",
    "prepare.val_fraction=0",
)
PROBE_SIZES = (128, 224)  # resolutions of the untuned-probe baseline (the photos upsampled to 224)


# ------------------------------------------------------------------------------------- photos
def photo_bytes(pixels: np.ndarray) -> bytes:
    """A 32 px CIFAR image as the JPEG file a user would have: upscaled (bicubic), quality 90."""
    image = Image.fromarray(pixels).resize((PHOTO_SIZE, PHOTO_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pick(y: np.ndarray, label: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.flatnonzero(y == label), size=count, replace=False)


def write_photo_folder(
    data_dir: Path, npz: dict, labeled_per_class: int, unlabeled: int, test_per_class: int, seed: int
) -> dict:
    """data/labeled/<class>/, data/unlabeled/batch-0001/, data/test/<class>/ plus planted problems."""
    rng = np.random.default_rng(seed)
    names = npz["class_names"]
    labels = [names.index(c) for c in CLASSES]
    x_train, y_train, x_test, y_test = npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"]
    used: set[int] = set()
    for label, name in zip(labels, CLASSES, strict=True):
        chosen = pick(y_train, label, labeled_per_class, rng)
        used.update(chosen.tolist())
        _write_all(data_dir / "labeled" / name, (x_train[i] for i in chosen), "img")
        _write_all(
            data_dir / "test" / name, (x_test[i] for i in pick(y_test, label, test_per_class, rng)), "test"
        )
    pool = np.setdiff1d(np.flatnonzero(np.isin(y_train, labels)), np.fromiter(used, dtype=np.int64))
    _write_all(
        data_dir / "unlabeled" / "batch-0001",
        (x_train[i] for i in rng.choice(pool, unlabeled, replace=False)),
        "u",
    )
    return plant_problems(data_dir)


def _write_all(folder: Path, images, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, pixels in enumerate(images):
        (folder / f"{prefix}{number:05d}.jpg").write_bytes(photo_bytes(pixels))


def plant_problems(data_dir: Path) -> dict:
    """The mistakes real photo folders have (found in a public photo set): prepare must report each."""
    first, second = CLASSES[0], CLASSES[1]
    twice = data_dir / "labeled" / second / "filed-twice.jpg"
    twice.write_bytes((data_dir / "labeled" / first / "img00000.jpg").read_bytes())
    leak = data_dir / "unlabeled" / "batch-0001" / "also-a-test-photo.jpg"
    leak.write_bytes((data_dir / "test" / first / "test00000.jpg").read_bytes())
    truncated = data_dir / "unlabeled" / "batch-0001" / "truncated.jpg"
    whole = (data_dir / "unlabeled" / "batch-0001" / "u00000.jpg").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    stray = data_dir / "labeled" / first / "notes.txt"
    stray.write_text("photographer's notes, not an image\n")
    return {p.name: str(p.relative_to(data_dir.parent)) for p in (twice, leak, truncated, stray)}


# ------------------------------------------------------------------------------------- running
def run(command: list[str] | str, cwd: Path, log: list[dict], env: dict | None = None) -> str:
    """Run one checklist command like a user would, record its output and duration, stop on failure.

    The recorded output names the clone's folder ``<clone>``: where it happened to be is not a result."""
    shown = command if isinstance(command, str) else " ".join(command)
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=cwd,
        shell=isinstance(command, str),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    seconds = time.perf_counter() - started
    output = done.stdout.replace(str(cwd.resolve()), "<clone>").replace(str(cwd), "<clone>")
    log.append(
        {"command": shown, "exit_code": done.returncode, "seconds": round(seconds, 1), "output": output}
    )
    print(done.stdout[-3000:], flush=True)
    if done.returncode != 0:
        raise SystemExit(f"first day: `{shown}` failed with exit code {done.returncode}")
    return done.stdout


def fresh_clone(workdir: Path) -> Path:
    clone = workdir / "kdpipe"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO / ".venv")
    # The venv is installed already: mark it newer than the clone's pyproject.toml for make.
    (REPO / ".venv" / ".installed").touch()
    # The venv's kdpipe is this checkout's src/ (an editable install): put the clone's first, so
    # that every command runs the committed code, not whatever this working tree holds now.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(clone / "src"), os.environ.get("PYTHONPATH")])
    )
    return clone


def champion_version(clone: Path) -> str | None:
    """The registry's @champion version, read with MLflow as the Makefile's store holds it."""
    code = (
        "import json, mlflow; c = mlflow.MlflowClient();"
        "print(json.dumps(c.get_model_version_by_alias('kdpipe-classifier', 'champion').version))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
    done = subprocess.run(
        [str(clone / ".venv/bin/python"), "-c", code], cwd=clone, env=env, text=True, capture_output=True
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def read_json(path: Path):
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------- report
def trimmed(output: str, lines: int = 40) -> str:
    kept = [line for line in output.splitlines() if line.strip() and "\r" not in line]
    if len(kept) <= lines:
        return "\n".join(kept)
    return "\n".join(kept[: lines // 2] + [f"... ({len(kept) - lines} lines left out)"] + kept[-lines // 2 :])


def write_report(result: dict, log: list[dict], out_md: Path, out_json: Path) -> None:
    out_json.write_text(
        json.dumps(
            {**result, "commands": [{k: v for k, v in e.items() if k != "output"} for e in log]}, indent=2
        )
        + "\n"
    )
    parts = [
        "# A first day with real photos (documented run)",
        "",
        "The README's *Bring your own data* checklist, followed start to finish in a fresh clone by",
        "`benchmarks/first_day.py` (`.venv/bin/python -m benchmarks.first_day`). The photos are",
        f"real: {len(CLASSES)} CIFAR-10 classes ({', '.join(CLASSES)}) from `../shared/data/cifar10_subset.npz`",
        f"(CIFAR-10, Krizhevsky 2009; see that file's README), upscaled to {PHOTO_SIZE} px JPEG files as a",
        "user's downsized photos would be. Four real-life problems were planted in the folder: "
        + ", ".join(f"`{p}`" for p in result["planted"].values())
        + ".",
        "",
        f"Run on {result['machine']}, {result['date']}; {result['total_minutes']:.1f} minutes in all.",
        "",
        "## What it measured",
        "",
        "| | |",
        "| --- | --- |",
    ]
    for key, value in result["figures"].items():
        parts.append(f"| {key} | {value} |")
    parts += ["", "## Every command, as run, with its output (trimmed)", ""]
    for entry in log:
        parts += [
            f"### `{entry['command']}`",
            "",
            f"exit code {entry['exit_code']}, {entry['seconds']:.0f} s",
            "",
            "```",
            trimmed(entry["output"]) or "(no output)",
            "```",
            "",
        ]
    out_md.write_text("\n".join(parts))


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 subset npz")
    parser.add_argument("--workdir", help="where the fresh clone goes (default: a temporary folder)")
    parser.add_argument("--labeled-per-class", type=int, default=20)
    parser.add_argument("--unlabeled", type=int, default=1500)
    parser.add_argument("--test-per-class", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "docs" / "first-day.md"))
    args = parser.parse_args(argv)
    if not Path(args.data).is_file():
        print(
            f"first day: {args.data} is missing (the CIFAR-10 subset lives in ../shared/data/)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdpipe-first-day-"))
    started = time.perf_counter()
    clone = fresh_clone(workdir)
    log: list[dict] = []
    # Checklist step 1: the folders in place, the demo dropped (the clone has no data yet).
    planted = write_photo_folder(
        clone / "data",
        load_npz(args.data),
        args.labeled_per_class,
        args.unlabeled,
        args.test_per_class,
        args.seed,
    )
    run("make setup", clone, log)
    # Step 2: check the data before training.
    check = run([".venv/bin/kdpipe", "prepare", "--check"], clone, log)
    # Steps 3-4: the settings, then the run, with the README's commands.
    run([".venv/bin/dvc", "add", "data/labeled", "data/test", "data/unlabeled/batch-0001"], clone, log)
    run(f'make repro S="{" ".join(SETTINGS)}"', clone, log)
    champion_before = champion_version(clone)
    params_before = (clone / "params.yaml").read_text()
    selection = read_json(clone / "reports/select/selection.json")
    evaluation = read_json(clone / "reports/evaluate/metrics.json")
    manifest = read_json(clone / "reports/prepare/manifest.json")
    # An experiment for comparison: the same data, supervised only. It must not touch the workspace.
    experiment = run('make exp S="train.recipe=supervised" NAME=supervised', clone, log)
    supervised = _evaluated_accuracy(experiment)
    # The same distillation given twice the iterations: more training must not make the student worse.
    iterations = int(yaml_value(clone / "params.yaml", "train", "max_iterations"))
    longer = _evaluated_accuracy(
        run(f'make exp S="train.max_iterations={2 * iterations}" NAME=twice', clone, log)
    )
    probes = {size: probe_baseline(clone, size) for size in PROBE_SIZES}
    teacher_metrics = read_json(clone / "reports/teacher/metrics.json")
    shipped = evaluation["accuracy"]
    result = {
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "total_minutes": (time.perf_counter() - started) / 60,
        "settings": list(SETTINGS),
        "planted": planted,
        "figures": {
            "planted problems reported by `prepare --check`": sum(name in check for name in planted),
            "images per split (train / val / unlabeled / test)": " / ".join(
                str(manifest.get("counts", {}).get(s, "?")) for s in ("train", "val", "unlabeled", "test")
            ),
            "model chosen by select": f"{selection.get('chosen')} ({selection.get('reason', '')})",
            "test accuracy of the shipped ONNX model (recipe kd, distilled from the teacher)": f"{evaluation['accuracy']:.1%}",
            "test accuracy of the same student trained supervised (`make exp`, recipe supervised)": f"{supervised:.1%}",
            "distillation's gain on the test photos": f"{100 * (evaluation['accuracy'] - supervised):+.1f} points",
            f"the same distillation with twice the iterations (`make exp`, {2 * iterations})": f"{longer:.1%} ({100 * (longer - evaluation['accuracy']):+.1f} points)",
            "the teacher step: what it kept, and how it was judged": f"{teacher_metrics.get('kept')} ({teacher_metrics.get('estimated_by')}; fine-tuned "
            f"{_fmt(teacher_metrics.get('fine_tuned_val_accuracy'))}, linear probe "
            f"{_fmt((teacher_metrics.get('probe') or {}).get('estimate'))})",
            "teacher warnings": "; ".join(teacher_metrics.get("warnings") or []) or "none",
            **{
                f"untuned Lite0 linear probe on the same labels, {size} px, test accuracy": f"{acc:.1%}"
                for size, acc in probes.items()
            },
            **{
                f"shipped model minus the {size} px probe": f"{100 * (shipped - acc):+.1f} points"
                for size, acc in probes.items()
            },
            "params.yaml unchanged by `make exp`": params_before == (clone / "params.yaml").read_text(),
            "@champion unchanged by `make exp`": champion_before is not None
            and champion_before == champion_version(clone),
        },
    }
    write_report(result, log, Path(args.out), REPO / "benchmarks" / "results" / "first_day.json")
    print(
        f"first day: report written to {Path(args.out).relative_to(REPO) if Path(args.out).is_absolute() else args.out}"
    )
    return 0


def probe_baseline(clone: Path, size: int) -> float:
    """What a user with scikit-learn-style tools gets: a linear probe on the UNTUNED ImageNet Lite0
    features of the same labeled photos (every label: train and validation splits), computed at
    ``size`` px from prepare's teacher-resolution copy, scored on the same test photos."""
    import torch

    from kdpipe.data.prepared import load_prepared
    from kdpipe.training.devices import make_runtime
    from kdpipe.training.engine import accuracy, predict_logits
    from kdpipe.training.models import build_model
    from kdpipe.training.probe import fit_probe, install

    data = load_prepared(clone / "artifacts" / "prepared")
    train = data.train_xt if data.train_xt is not None else data.train_x
    val = data.val_xt if data.val_xt is not None else data.val_x
    test = data.test_xt if data.test_xt is not None else data.test_x
    x, y = np.concatenate([np.asarray(train), np.asarray(val)]), np.concatenate([data.train_y, data.val_y])
    runtime = make_runtime("cpu", "off", "off", torch.get_num_threads())
    model = build_model(
        "tf_efficientnet_lite0",
        data.num_classes,
        int(train.shape[1]),
        "efficientnet_lite0_imagenet",
        input_size=size,
    )
    install(model, fit_probe(model, x, y, None, None, data.num_classes, runtime, flip=True))
    return accuracy(predict_logits(model, np.asarray(test), runtime), data.test_y)


def yaml_value(path: Path, group: str, key: str):
    import yaml

    return yaml.safe_load(path.read_text())[group][key]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _evaluated_accuracy(output: str) -> float:
    """The test accuracy the evaluate stage printed (``evaluate: accuracy 0.5160 on ...``)."""
    import re

    found = re.findall(r"evaluate: accuracy ([0-9.]+) on", output)
    if not found:
        raise SystemExit("first day: the experiment printed no evaluate line")
    return float(found[-1])


if __name__ == "__main__":
    raise SystemExit(main())
