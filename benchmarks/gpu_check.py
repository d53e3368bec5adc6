"""GPU check: run every CUDA code path of kdpipe once, on a small synthetic data set, and write one JSON.

Run it first on any new GPU machine (``make gpu-check``; under 5 minutes on one GPU, no network). Each
check is independent: one that fails is recorded with its error and the others still run. Where
there is no CUDA device the script says so in one line and writes ``{"gpu": false}``.

Checks:

* ``amp_bf16`` / ``amp_fp16``: training steps under autocast (fp16 with the GradScaler), channels_last;
* ``masked_augmentation``: the strong policy run masked on the device (no host read) against the
  grouped way on the same draws;
* ``pipeline``: prepare, the teacher step, augment (teacher logits in torch on CUDA) and a few
  distill steps of every recipe on CUDA (pinned-memory prefetch, non-blocking copies), plus the
  frozen teacher run online on fresh views;
* ``onnxruntime_cuda``: the CUDA execution provider against the CPU one on the teacher's ONNX graph;
* ``ddp_nccl``: one DistributedDataParallel step over NCCL in a one-process group;
* ``resume_across_devices``: a distill run checkpointed on the CPU, resumed on the GPU, then on the CPU;
* ``throughput``: student training and teacher inference images/s at the benchmarks' GPU sizes.

    .venv/bin/python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import provenance

RECIPES = ("supervised", "kd", "cotrain", "adaptive", "consistency", "full")


def environment() -> dict[str, Any]:
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "gpu": torch.cuda.is_available()}
    if info["gpu"]:
        from kdpipe.training.devices import native_cuda_bf16

        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            native_bf16=native_cuda_bf16(),
            devices=torch.cuda.device_count(),
        )
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def check_amp(dtype: torch.dtype, device: str = "cuda") -> dict[str, Any]:
    """A few training steps of cnn_medium under autocast, channels_last, with the GradScaler for fp16."""
    from kdpipe.training.devices import Runtime
    from kdpipe.training.models import build_model

    runtime = Runtime(torch.device(device), dtype, True)
    model = build_model("cnn_medium", 10, 32).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = runtime.grad_scaler()
    batch, steps = (128, 20) if device == "cuda" else (16, 6)  # autocast on a CPU is slow: a token run
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    losses = [_train_step(model, optimizer, scaler, runtime, x, y) for _ in range(steps)]
    assert all(np.isfinite(losses)), f"non-finite loss: {losses}"
    assert losses[-1] < losses[0], f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "scaler_enabled": scaler.is_enabled(),
        "scale": float(scaler.get_scale()) if scaler.is_enabled() else None,
    }


def _train_step(model, optimizer, scaler, runtime, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step under the runtime's autocast, through the GradScaler; the loss."""
    with runtime.autocast():
        loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss)


def check_masked_augmentation(device: str = "cuda") -> dict[str, Any]:
    """The strong policy run masked on the GPU gives the grouped way's images for the same draws."""
    from kdpipe.training.augmentation import AugmentConfig, augment, make_generator

    x = torch.randint(0, 256, (256, 3, 64, 64), dtype=torch.uint8, device=device)
    cfg = AugmentConfig()
    masked = augment(x, make_generator(3, device), 1.0, cfg, grouped=False)
    grouped = augment(x, make_generator(3, device), 1.0, cfg, grouped=True)
    gap = float((masked - grouped).abs().max())
    assert gap < 1e-4, f"masked and grouped augmentation differ by {gap}"
    return {"max_abs_difference": gap}


def _tiny_data(root: Path) -> None:
    """Three learnable colour classes, labeled, unlabeled and test PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("labeled", 12), ("test", 3)):
        for label, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(_colour_image(label, rng)).save(folder / f"{k}.png")
    folder = root / "unlabeled" / "batch-0001"
    folder.mkdir(parents=True)
    for k in range(48):
        Image.fromarray(_colour_image(k % 3, rng)).save(folder / f"u{k}.png")


def _colour_image(label: int, rng) -> np.ndarray:
    img = rng.integers(0, 90, (48, 48, 3)).astype(np.int16)
    img[..., label] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def _params(device: str, **train):
    from kdpipe.core.params import validate_params

    return validate_params(
        {
            "prepare": {"image_size": 32, "val_fraction": 0.25},
            "augment": {"views": 4, "preview_samples": 2},
            "teacher": {
                "image_size": 64,
                "max_iterations": 6,
                "epochs": None,
                "eval_every": 3,
                "student_check_iterations": 4,
                "batch_size": 8,
            },
            "train": {
                "recipe": "kd",
                "student_arch": "cnn_tiny",
                "batch_size": 16,
                "max_iterations": 6,
                "eval_every": 3,
                "epoch_iterations": 3,
                "checkpoint_every": 3,
                "device": device,
                **train,
            },
        }
    )


def check_pipeline(work: Path, device: str = "cuda") -> dict[str, Any]:
    """prepare, teacher, augment and every recipe's distill on CUDA."""
    from kdpipe.steps import augment, distill, prepare, teacher

    _tiny_data(work / "data")
    params = _params(device)
    prepare.run(params, work / "data", work / "prepared")
    result = {"teacher": teacher.run(params, work / "prepared", work / "teacher")["val_accuracy"]}
    policy = augment.run(params, work / "prepared", work / "augmented", work / "teacher")
    result["augment_teacher_inference"] = (policy.get("teacher") or {}).get("inference")
    expected = "torch" if device == "cuda" else "onnxruntime"  # auto: torch on CUDA
    assert result["augment_teacher_inference"] == expected, policy.get("teacher")
    for recipe in RECIPES:
        trained = distill.run(
            _params(device, recipe=recipe),
            work / "prepared",
            work / "augmented",
            work / "teacher",
            work / f"distill-{recipe}",
        )
        result[recipe] = trained["best_student"]["accuracy"]
    online = distill.run(
        _params(device, recipe="kd", teacher_online="on"),
        work / "prepared",
        work / "augmented",
        work / "teacher",
        work / "distill-kd-online",
    )
    result["kd_teacher_online"] = online["best_student"]["accuracy"]
    return result


def check_onnxruntime_cuda(work: Path) -> dict[str, Any]:
    """The teacher's ONNX graph on the CUDA execution provider against the CPU one."""
    import onnxruntime as ort

    from kdpipe.export.onnx import CPU, export_onnx, make_session
    from kdpipe.training import checkpoints

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu, "
            "and never onnxruntime beside it)"
        )
    model, ckpt = checkpoints.load_model(work / "teacher" / "teacher.pt")
    path = export_onnx(model, work / "teacher.onnx", int(ckpt["image_size"]), 17)
    cuda = make_session(path, ["CUDAExecutionProvider"])  # refuses a silent fallback to the CPU
    cpu = make_session(path, [CPU])
    x = np.random.default_rng(0).random(
        (32, 3, int(ckpt["image_size"]), int(ckpt["image_size"])), dtype=np.float32
    )
    name = cuda.get_inputs()[0].name
    gap = float(np.abs(cuda.run(None, {name: x})[0] - cpu.run(None, {name: x})[0]).max())
    assert gap < 1e-3, f"CUDA and CPU providers differ by {gap}"
    return {"providers": cuda.get_providers(), "max_abs_difference": gap}


def check_ddp_nccl(device: str = "cuda") -> dict[str, Any]:
    """One DDP step over NCCL in a one-process group (what torchrun sets up, without torchrun)."""
    import os
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kdpipe.training.models import build_model

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    saved = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        ids = [0] if device == "cuda" else None
        model = DistributedDataParallel(build_model("cnn_tiny", 10, 32).to(device), device_ids=ids)
        x, y = torch.rand(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grad = next(p.grad for p in model.parameters() if p.grad is not None)
        return {
            "backend": dist.get_backend(),
            "loss": float(loss),
            "gradient_finite": bool(torch.isfinite(grad).all()),
        }
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_resume_across_devices(work: Path, device: str = "cuda") -> dict[str, Any]:
    """One distill run (same settings throughout) stopped after 3 steps on the CPU, resumed on the GPU
    for 3 more, stopped, then finished on the CPU: the resume state crosses devices both ways."""
    from kdpipe.steps.distill import build_trainer

    out = work / "resume"
    legs = []
    for leg_device, steps in (("cpu", 3), (device, 3), ("cpu", None)):
        trainer = build_trainer(
            _params(leg_device, recipe="full", max_iterations=9),
            work / "prepared",
            work / "augmented",
            work / "teacher",
            out,
            progress=False,
        )
        resumed_at = trainer.iteration if trainer.try_resume() else 0
        if steps is None:
            trainer.run()
        else:  # a preempted leg: a few steps, then the resume state, as the loop writes it
            trainer.nets.set_train_modes(trainer.iteration)
            with trainer.batches.prefetching():
                for _ in range(steps):
                    trainer.train_step()
            trainer.save_last()
        legs.append({"device": leg_device, "resumed_at": resumed_at, "reached": trainer.iteration})
    assert [leg["resumed_at"] for leg in legs] == [0, 3, 6] and legs[-1]["reached"] == 9, legs
    return {"legs": legs}


def check_throughput() -> dict[str, Any]:
    """Images/s: student training (cnn_medium, 32 px, batch 256, AMP) and teacher inference (Lite0 at
    224 px, batch 256, AMP), the sizes of the label-efficiency benchmark's GPU preset."""
    from kdpipe.training.devices import make_runtime
    from kdpipe.training.models import build_model

    runtime = make_runtime("cuda", "auto", "auto")
    student = build_model("cnn_medium", 10, 32).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    scaler = runtime.grad_scaler()
    x = torch.rand(256, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), device="cuda")

    def train_step():
        _train_step(student, optimizer, scaler, runtime, x, y)

    teacher = build_model("tf_efficientnet_lite0", 10, 224, "efficientnet_lite0_imagenet").cuda().eval()
    teacher = teacher.to(memory_format=torch.channels_last)
    images = torch.rand(256, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def teacher_step():
        with runtime.autocast():
            teacher(images)

    return {
        "student_train_images_per_s": _rate(train_step, 256),
        "teacher_inference_images_per_s": _rate(teacher_step, 256),
        "amp": str(runtime.amp_dtype),
    }


def _rate(step, batch: int, seconds: float = 5.0) -> float:
    for _ in range(3):  # warm-up: cuDNN picks its kernels
        step()
    torch.cuda.synchronize()
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        steps += 1
    torch.cuda.synchronize()
    return round(batch * steps / (time.perf_counter() - started), 1)


def run_checks(work: Path, device: str = "cuda") -> dict[str, Any]:
    """Every check on ``device``: "cuda", or "cpu" for a dry run of the same code (the CUDA-only parts,
    onnxruntime's CUDA provider and the throughput figures, are left out)."""
    from kdpipe.training.devices import native_cuda_bf16

    checks: dict[str, Any] = {}
    plan = [("amp_fp16", lambda: check_amp(torch.float16, device))]
    if device == "cpu" or native_cuda_bf16():
        plan.insert(0, ("amp_bf16", lambda: check_amp(torch.bfloat16, device)))
    plan += [
        ("masked_augmentation", lambda: check_masked_augmentation(device)),
        ("pipeline", lambda: check_pipeline(work, device)),
        ("ddp_nccl", lambda: check_ddp_nccl(device)),
        ("resume_across_devices", lambda: check_resume_across_devices(work, device)),
    ]
    if device == "cuda":
        plan += [("onnxruntime_cuda", lambda: check_onnxruntime_cuda(work)), ("throughput", check_throughput)]
    for name, check in plan:
        started = time.perf_counter()
        try:
            checks[name] = {"ok": True, **check()}
        except Exception as exc:  # every check is recorded; one failure does not hide the others
            checks[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5),
            }
        checks[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(
            f"gpu-check: {name}: {'ok' if checks[name]['ok'] else 'FAILED ' + checks[name]['error']} "
            f"({checks[name]['seconds']} s)",
            flush=True,
        )
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", default="benchmarks/results/gpu_check", help="output path without suffix (.json)"
    )
    ap.add_argument(
        "--dry-run-on-cpu",
        action="store_true",
        help="run the same checks on the CPU (what can run there): a test of this script, not of a GPU",
    )
    args = ap.parse_args(argv)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {**provenance("benchmarks.gpu_check", argv), **environment()}
    if args.dry_run_on_cpu:
        with tempfile.TemporaryDirectory(prefix="kdpipe-gpu-check-") as tmp:
            checks = run_checks(Path(tmp), "cpu")
        failed = [name for name, check in checks.items() if not check["ok"]]
        out.write_text(
            json.dumps({**info, "dry_run_on_cpu": True, "checks": checks, "failed": failed}, indent=2) + "\n"
        )
        print(
            f"gpu-check (dry run on the CPU): {len(checks) - len(failed)} of {len(checks)} checks passed; wrote {out}"
        )
        return 1 if failed else 0
    if not info["gpu"]:
        out.write_text(json.dumps(info, indent=2) + "\n")
        print(
            f"gpu-check: no CUDA GPU here (torch {info['torch']}, CUDA build {info['cuda_build'] or 'none'}): "
            f"nothing to check; wrote {out}"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="kdpipe-gpu-check-") as tmp:
        checks = run_checks(Path(tmp))
    failed = [name for name, check in checks.items() if not check["ok"]]
    out.write_text(json.dumps({**info, "checks": checks, "failed": failed}, indent=2) + "\n")
    print(f"gpu-check: {len(checks) - len(failed)} of {len(checks)} checks passed; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
