"""From measured per-core rates to the whole pipeline on a million 224-pixel images (issue 17).

Measures here, on one thread each (so the figures are per core):

- augment: views/s of kdpipe's augmentation at 224 px (weak, and weak + strong policy);
- teacher inference: images/s of the EfficientNet-Lite0 teacher at 224 px in onnxruntime (what
  the augment step uses on a CPU);

and reads, from the result files of the other data-path benchmarks (run them first):

- prepare: kdpipe's decode rate per process (``prepare_throughput.json``, workers=1);
- batch assembly: images/s of the input pipeline's host part at 224 px (``batch_assembly.json``).

Then writes the arithmetic for 1,000,000 images at 224 px on a machine with 32 cores and one GPU:
the CPU-bound stages scale with cores (measured: prepare's pool on 2 cores in prepare_throughput),
the GPU-bound ones need a GPU rate this machine cannot measure, so they are given as an assumption
(stated, with the figure used) and as the CPU-only bound measured here. Disk: from the array shapes.

    .venv/bin/python -m benchmarks.scale_extrapolation

Results: benchmarks/results/scale_extrapolation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_description, provenance

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES = 1_000_000
SIZE = 224
CORES = 32
VIEWS = 2  # augment.views default
CLASSES = 100
# Assumed, not measured (no GPU here): EfficientNet-Lite0 inference at 224 px in fp16 on one
# data-centre GPU, and a small student's forward + backward at 224 px on the same GPU. Both are
# conservative round figures for an A100/H100-class card; replace them with a measurement there.
ASSUMED_GPU_TEACHER_IMAGES_PER_S = 8_000
ASSUMED_GPU_STUDENT_TRAIN_IMAGES_PER_S = 10_000


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def augment_rate(batch: int = 32, repeats: int = 3) -> dict[str, float]:
    from kdpipe.training.augmentation import AugmentConfig, augment, make_generator

    x = torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8)
    cfg, gen = AugmentConfig(), make_generator(0)
    return {
        kind: batch / _timed(lambda p=p: augment(x, gen, p, cfg), repeats)
        for kind, p in (("weak", 0.0), ("strong", 1.0))
    }


def teacher_rate(batch: int = 16, repeats: int = 3) -> float:
    import tempfile

    from kdpipe.export.onnx import CPU, export_onnx, make_session
    from kdpipe.training.models import build_model

    model = build_model("tf_efficientnet_lite0", num_classes=CLASSES, image_size=SIZE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "teacher.onnx", SIZE, 17)
        session = make_session(path, [CPU], threads=1)
        x = np.random.default_rng(0).random((batch, 3, SIZE, SIZE), dtype=np.float32)
        name = session.get_inputs()[0].name
        return batch / _timed(lambda: session.run(None, {name: x}), repeats)


def _read(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `.venv/bin/python -m benchmarks.{name}` first")
    return json.loads(path.read_text())


def _prepare_rates(result: dict) -> tuple[float, float]:
    """kdpipe prepare's images/s with one worker, and the pool's speed-up on this machine's cores."""
    rows = {row["way"]: row for row in result["rows"]}
    return rows["kdpipe prepare, workers=1"]["images_per_s"], result["core_scaling"]


def _assembly_rate(result: dict) -> float:
    at_224 = next(size for size in result["sizes"] if size["image_size"] == SIZE)
    return at_224["images_per_s"]["new, NHWC gather (GPU device: host part), prefetch"]


def extrapolate(measured: dict) -> list[dict]:
    """One row per stage: its rate on the 32-core + 1 GPU machine and the hours for 1M images."""
    views = IMAGES * VIEWS
    prepare_rate = measured["prepare_per_core"] * CORES
    augment_cpu = measured["augment_per_core"] * CORES
    teacher_cpu = measured["teacher_per_core"] * CORES
    rows = [
        {
            "stage": "prepare (decode + resize, 32 worker processes)",
            "rate": prepare_rate,
            "unit": "images/s",
            "work": IMAGES,
            "basis": f"{measured['prepare_per_core']:.0f} images/s per process x {CORES}",
        },
        {
            "stage": "augment: views on the GPU",
            "rate": None,
            "unit": "views/s",
            "work": views,
            "basis": "GPU (not measured); small next to the teacher's inference below",
        },
        {
            "stage": "augment: views on 32 CPU cores (no GPU)",
            "rate": augment_cpu,
            "unit": "views/s",
            "work": views,
            "basis": f"{measured['augment_per_core']:.0f} views/s per core x {CORES}",
        },
        {
            "stage": "augment: teacher logits, GPU (assumed)",
            "rate": ASSUMED_GPU_TEACHER_IMAGES_PER_S,
            "unit": "views/s",
            "work": views,
            "basis": "assumption: Lite0 fp16 on one data-centre GPU",
        },
        {
            "stage": "augment: teacher logits, 32 CPU cores (onnxruntime)",
            "rate": teacher_cpu,
            "unit": "views/s",
            "work": views,
            "basis": f"{measured['teacher_per_core']:.1f} images/s per core x {CORES}",
        },
        {
            "stage": "distill input pipeline (1 gather thread)",
            "rate": measured["assembly_per_thread"],
            "unit": "images/s",
            "work": None,
            "basis": "batch_assembly, 224 px, GPU host part with prefetch",
        },
        {
            "stage": "distill: student training, GPU (assumed), 10 epochs of 1M",
            "rate": ASSUMED_GPU_STUDENT_TRAIN_IMAGES_PER_S,
            "unit": "images/s",
            "work": 10 * IMAGES,
            "basis": "assumption: small student fwd+bwd at 224 px on one data-centre GPU",
        },
    ]
    for row in rows:
        row["hours"] = None if not row["rate"] or not row["work"] else row["work"] / row["rate"] / 3600
    return rows


def disk() -> list[dict]:
    image = SIZE * SIZE * 3
    gb = 1e9
    return [
        {"what": "source JPEGs (about 100 kB each)", "gb": IMAGES * 100e3 / gb},
        {"what": "prepared arrays (uint8, 224x224x3)", "gb": IMAGES * image / gb},
        {"what": "decode spool while prepare runs (freed at its end)", "gb": IMAGES * image / gb},
        {"what": f"stored views ({VIEWS} per image, uint8)", "gb": IMAGES * VIEWS * image / gb},
        {
            "what": f"teacher logits ({VIEWS} views x {CLASSES} classes, float32)",
            "gb": IMAGES * VIEWS * CLASSES * 4 / gb,
        },
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    torch.set_num_threads(1)
    prepare_one, pool_speedup = _prepare_rates(_read("prepare_throughput"))
    aug = augment_rate()
    measured = {
        "prepare_per_core": prepare_one,
        "prepare_pool_speedup_on_this_machine": pool_speedup,
        "augment_per_core_weak": aug["weak"],
        "augment_per_core_strong": aug["strong"],
        # the stored views are half weak, half strong (augment.p = 0.5)
        "augment_per_core": 2 / (1 / aug["weak"] + 1 / aug["strong"]),
        "teacher_per_core": teacher_rate(),
        "assembly_per_thread": _assembly_rate(_read("batch_assembly")),
    }
    rows, space = extrapolate(measured), disk()
    result = {
        **provenance("benchmarks.scale_extrapolation", argv),
        "cpu": cpu_description(),
        "measured_per_core": measured,
        "stages": rows,
        "disk_gb": space,
        "assumptions": {
            "gpu_teacher_images_per_s": ASSUMED_GPU_TEACHER_IMAGES_PER_S,
            "gpu_student_train_images_per_s": ASSUMED_GPU_STUDENT_TRAIN_IMAGES_PER_S,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_extrapolation.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "scale_extrapolation.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(result: dict) -> str:
    m = result["measured_per_core"]
    lines = [
        f"# 1M images at 224 px on {CORES} cores + 1 GPU, from rates measured here",
        "",
        f"Command: `.venv/bin/python -m benchmarks.scale_extrapolation` ({result['cpu']}, {result.get('date', '')}).",
        "",
        "Measured per core (one thread or process):",
        "",
        f"- prepare: {m['prepare_per_core']:.0f} images/s per process (its pool ran "
        f"{m['prepare_pool_speedup_on_this_machine']:.2f}x faster on this machine's cores)",
        f"- augment at 224 px: {m['augment_per_core_weak']:.0f} views/s weak, {m['augment_per_core_strong']:.0f} "
        f"strong ({m['augment_per_core']:.0f} for the half-and-half mix)",
        f"- teacher (Lite0, onnxruntime) at 224 px: {m['teacher_per_core']:.1f} images/s",
        f"- batch assembly at 224 px: {m['assembly_per_thread']:,.0f} images/s per gather thread",
        "",
        "| stage | rate on 32 cores + 1 GPU | work | hours | basis |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in result["stages"]:
        rate = "-" if row["rate"] is None else f"{row['rate']:,.0f} {row['unit']}"
        work = "-" if row["work"] is None else f"{row['work']:,}"
        hours = "-" if row["hours"] is None else f"{row['hours']:.2f}"
        lines.append(f"| {row['stage']} | {rate} | {work} | {hours} | {row['basis']} |")
    lines += ["", "| disk | GB |", "| --- | --- |"]
    lines += [f"| {d['what']} | {d['gb']:,.1f} |" for d in result["disk_gb"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
