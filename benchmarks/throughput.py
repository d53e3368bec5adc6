"""Training throughput of a `distill` step (recipe `full`), side by side in one process:

(1) kdpipe  — the real trainer step: sampling from the packed uint8 arrays, on-device batch
    augmentation, both networks, the recipe's loss, backward, optimizer steps;
(2) compute-only bound — the same models, batch, views and loss on tensors already in memory
    (no sampling, no augmentation): what the step would cost if data were free;
(3) naive — what users typically write: torchvision `ImageFolder` over the PNG files, PIL
    transforms per sample (crop-pad, flip, RandAugment, erasing for the extra views) and a
    `DataLoader`, feeding the same model step.

Rounds are interleaved (1, 2, 3, 1, 2, 3, ...) so machine load hits all three alike; each
ratio is the median of per-round ratios. Images/s counts samples per step (labeled + unlabeled).

    .venv/bin/python -m benchmarks.throughput [--rounds 3] [--steps 20]
Needs the demo data and the prepared/teacher outputs: run `make repro` first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_description, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _trainer(params, workdir: Path):
    from kdpipe.steps.distill import build_trainer

    return build_trainer(
        params,
        REPO / "artifacts/prepared",
        REPO / "artifacts/augmented",
        REPO / "artifacts/teacher",
        workdir,
        progress=False,
    )


def _naive_loaders(params, batch: int, unlabeled_batch: int, views: int, workers: int):
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchvision import datasets, transforms

    size = params.prepare.image_size
    weak = [
        transforms.Resize((size, size)),
        transforms.RandomCrop(size, padding=params.augment.pad, padding_mode="reflect"),
    ]
    if params.augment.flip:
        weak.append(transforms.RandomHorizontalFlip())
    strong = transforms.Compose(
        [
            *weak,
            transforms.RandAugment(num_ops=params.augment.num_ops),
            transforms.ToTensor(),
            transforms.RandomErasing(p=params.augment.erase_prob),
        ]
    )
    weak_t = transforms.Compose([*weak, transforms.ToTensor()])

    def multi_view(img):
        return torch.stack([weak_t(img)] + [strong(img) for _ in range(views - 1)])

    class Flat(Dataset):
        def __init__(self, root):
            self.files = sorted(p for p in Path(root).rglob("*.png"))

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            from PIL import Image

            with Image.open(self.files[i]) as img:
                return multi_view(img.convert("RGB")), -1

    labeled = datasets.ImageFolder(REPO / params.data.root / "labeled", transform=multi_view)
    unlabeled = Flat(REPO / params.data.root / "unlabeled")
    kw = dict(shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    return (
        DataLoader(labeled, batch_size=batch, **kw),
        DataLoader(unlabeled, batch_size=unlabeled_batch, **kw),
    )


def run(args) -> dict:
    import torch

    from kdpipe.core.params import load_params

    torch.set_num_threads(args.threads)
    params = load_params(REPO / "params.yaml", ["train.recipe=full", *args.set])
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdpipe-throughput-"))
    trainer = _trainer(params, workdir)
    n_samples = trainer.cfg.batch_size + trainer.sampler.unlabeled_size
    fixed = trainer.next_batch()
    loaders = _naive_loaders(
        params, trainer.cfg.batch_size, trainer.sampler.unlabeled_size, trainer.recipe.num_views, args.workers
    )

    def endless(loader):  # a small labeled set runs out of batches: start a new epoch, as users do
        while True:
            yield from loader

    iters = [endless(loader) for loader in loaders]

    def naive_batch():
        from kdpipe.training.views import Batch

        (xl, yl), (xu, _) = next(iters[0]), next(iters[1])
        x = torch.cat([xl, xu])  # (N, K, C, H, W)
        labels = torch.cat([yl, torch.full((len(xu),), -1)])
        views = [x[:, k] for k in range(x.shape[1])]
        wanted = set(trainer.recipe.teacher_views)
        return Batch(
            labels, views, [v if k in wanted else None for k, v in enumerate(views)], [None] * len(views)
        )

    modes = {
        "kdpipe distill step": lambda: trainer.step(),
        "compute-only bound": lambda: trainer.step(fixed),
        "naive ImageFolder + DataLoader": lambda: trainer.step(naive_batch()),
    }
    for call in modes.values():  # warm-up (DataLoader workers start, kernels chosen)
        call()
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, call in modes.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                call()
            rates[name].append(n_samples * args.steps / (time.perf_counter() - start))
    kd, bound, naive = (rates[n] for n in modes)
    return {
        "machine": f"{cpu_description()}, {args.threads} torch threads, DataLoader workers {args.workers}",
        "recipe": "full",
        "student": params.train.student_arch,
        "teacher": params.teacher.arch,
        "samples_per_step": n_samples,
        "views": trainer.recipe.num_views,
        "image_size": params.prepare.image_size,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "images_per_s": {name: statistics.median(v) for name, v in rates.items()},
        "kdpipe / compute-only bound": statistics.median(k / b for k, b in zip(kd, bound, strict=True)),
        "kdpipe / naive": statistics.median(k / n for k, n in zip(kd, naive, strict=True)),
    }


def markdown(r: dict) -> str:
    lines = [
        f"Machine: {r['machine']}; recipe {r['recipe']} ({r['student']} student, {r['teacher']} teacher), "
        f"{r['samples_per_step']} samples x {r['views']} views per step, {r['image_size']}px, "
        f"{r['rounds']} interleaved rounds of {r['steps_per_round']} steps.",
        "",
        "| pipeline | images/s |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["images_per_s"].items()]
    lines += [
        "",
        f"kdpipe / compute-only bound = {r['kdpipe / compute-only bound']:.2f}; "
        f"kdpipe / naive = {r['kdpipe / naive']:.2f} (medians of per-round ratios).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the naive pipeline")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default="benchmarks/results/throughput")
    args = parser.parse_args(argv)
    if not (REPO / "artifacts/teacher/teacher.pt").is_file():
        print("no teacher in artifacts/teacher: run `make repro` first", file=sys.stderr)
        return 2
    result = run(args)
    write_results(REPO / args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
