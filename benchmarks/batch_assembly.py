"""Batch assembly of the training input pipeline, side by side in one process (issue 17):

(1) old path -- the assembly before the prefetcher, reproduced here: fancy-index gathers from the
    memory maps, a concatenate, a second copy (``np.array``) and a permute + contiguous on the CPU,
    all on the training thread;
(2) new, NCHW gather, no prefetch -- what kdpipe does for a CPU device: one copy, each row read
    in file order and written, transposed to CHW, straight into its batch slot of a fresh buffer;
    here on the training thread;
(3) new, NCHW gather, prefetch -- the same in kdpipe's background thread (depth 2): the training
    thread only takes ready batches;
(4) new, NHWC gather, prefetch -- the host part for a GPU device: one memcpy per row into a
    buffer (pinned on a GPU); the GPU then permutes and converts to float (not measured here);
(5) compute-only bound -- forward + backward + SGD step of the default student (``cnn_tiny``) on
    a batch already in memory: the rate the input pipeline must beat not to starve compute.

The images are synthetic uint8 arrays written as .npy and memory-mapped (read from the page cache
after the first round), at 224 px and 32 px; each step draws ``batch`` labeled + ``batch`` x mu
unlabeled indices from kdpipe's sampler. Rounds are interleaved so machine load hits every path
alike; each figure is the median over rounds, each ratio the median of per-round ratios. The old
path copies from the memory map (every page it touched stays mapped after the first round); the
new paths read the rows from the files with preadv, as kdpipe does (``kdpipe.data.mapped.FileRows``),
so nothing they read stays resident.

    .venv/bin/python -m benchmarks.batch_assembly [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_description, write_results

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m benchmarks.batch_assembly"


def _memmapped(folder: Path, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A random uint8 array written as .npy (in chunks: bounded memory) and memory-mapped back."""
    path = folder / f"{name}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    rng = np.random.default_rng(seed)
    for start in range(0, shape[0], 256):
        out[start : start + 256] = rng.integers(
            0, 256, (min(256, shape[0] - start), *shape[1:]), dtype=np.uint8
        )
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


class _Data:
    """The fields of kdpipe's TrainingData that the online views' host part reads."""

    def __init__(self, labeled: np.ndarray, unlabeled: np.ndarray):
        self.train_x, self.unlabeled_x = labeled, unlabeled
        self.train_y = np.zeros(len(labeled), dtype=np.int64)
        self.teacher_train_x = self.teacher_unlabeled_x = None
        self.image_size = labeled.shape[1]


class _AssemblyOnly:
    """The host part of kdpipe's OnlineViews (views.OnlineViews.host: labels and one gather), and a
    device part cut to nothing: assembly alone, without augmentation. ``channels_first``: the
    images are gathered as NCHW (what kdpipe does for a CPU device) or as NHWC (for a GPU, which
    then permutes them itself)."""

    def __init__(self, data: _Data, runtime, channels_first: bool):
        self.data, self.rt, self.channels_first = data, runtime, channels_first

    def draw_key(self):
        return None

    def host(self, l_idx, u_idx, key=None):
        from kdpipe.training.views import HostBatch, gather_batch, labels_tensor

        d = self.data
        images = gather_batch(d.train_x, d.unlabeled_x, (l_idx,), (u_idx,), self.rt, self.channels_first)
        return HostBatch(labels_tensor(d.train_y, l_idx, len(u_idx)), [images], [None])

    def on_device(self, host):
        return host.images[0]


def _old_batch(data: _Data, sampler, runtime) -> torch.Tensor:
    """views.py before the prefetcher (OnlineViews._images + to_nchw + Runtime.to_device)."""
    l_idx, u_idx = sampler.next()
    images = np.concatenate(
        [data.train_x[l_idx], data.unlabeled_x[u_idx] if len(u_idx) else data.train_x[:0]]
    )
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    return runtime.to_device(x)


def _compute_step(size: int, n: int, runtime):
    """One forward + backward + SGD step of cnn_tiny on a fixed float batch (the compute-only bound)."""
    from kdpipe.training.models import build_model

    model = build_model("cnn_tiny", 10, size).to(runtime.device)
    if runtime.wants_channels_last(model):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(n, 3, size, size, device=runtime.device)
    if runtime.wants_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), device=runtime.device)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _synchronize(runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def measure(size: int, n_images: int, args, runtime, folder: Path) -> dict:
    from kdpipe.data.prefetch import BatchStream
    from kdpipe.data.samplers import LabeledUnlabeledSampler, unlabeled_batch_size

    half = n_images // 2
    data = _Data(
        _memmapped(folder, f"labeled{size}", (half, size, size, 3), 1),
        _memmapped(folder, f"unlabeled{size}", (n_images - half, size, size, 3), 2),
    )
    per_step = args.batch + unlabeled_batch_size(args.batch, args.mu)

    def sampler():
        return LabeledUnlabeledSampler(len(data.train_x), len(data.unlabeled_x), args.batch, args.mu, seed=0)

    old_sampler = sampler()
    streams = {
        name: BatchStream(sampler(), _AssemblyOnly(data, runtime, channels_first), depth)
        for name, channels_first, depth in (
            ("new, NCHW gather (CPU device), no prefetch", True, 0),
            ("new, NCHW gather (CPU device), prefetch", True, 2),
            ("new, NHWC gather (GPU device: host part), prefetch", False, 2),
        )
    }
    compute = _compute_step(size, per_step, runtime)
    modes = {
        "old path": lambda: _old_batch(data, old_sampler, runtime),
        **{name: stream.next for name, stream in streams.items()},
        "compute-only bound (cnn_tiny fwd+bwd)": compute,
    }
    with contextlib.ExitStack() as prefetching:
        for stream in streams.values():
            prefetching.enter_context(stream.prefetching())
        for call in modes.values():  # warm-up: page cache, threads started, kernels chosen
            for _ in range(3):
                call()
        rates: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, call in modes.items():
                steps = args.compute_steps if name.startswith("compute") else args.steps
                _synchronize(runtime)
                start = time.perf_counter()
                for _ in range(steps):
                    call()
                _synchronize(runtime)
                rates[name].append(per_step * steps / (time.perf_counter() - start))
                if name in streams:  # no head start in the next round from batches drawn ahead during others
                    streams[name].stop()
    old = rates["old path"]
    return {
        "image_size": size,
        "images_in_arrays": n_images,
        "images_per_step": per_step,
        "array_bytes": int(data.train_x.nbytes + data.unlabeled_x.nbytes),
        "images_per_s": {name: round(statistics.median(v), 1) for name, v in rates.items()},
        "ratio_to_old": {
            name: round(statistics.median(r / o for r, o in zip(v, old, strict=True)), 2)
            for name, v in rates.items()
            if name != "old path"
        },
    }


def run(args) -> dict:
    from kdpipe.training.devices import make_runtime

    torch.set_num_threads(args.threads)
    runtime = make_runtime(args.device, amp="off", channels_last="auto", threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="batch-assembly-") as scratch:
        results = [
            measure(size, n, args, runtime, Path(scratch))
            for size, n in ((224, args.images_224), (32, args.images_32))
        ]
    return {
        "command": COMMAND + (" " + " ".join(args.argv) if args.argv else ""),
        "machine": f"{cpu_description()}, {args.threads} torch threads, device {runtime.device}",
        "batch": args.batch,
        "mu": args.mu,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "compute_steps_per_round": args.compute_steps,
        "sizes": results,
    }


def markdown(r: dict) -> str:
    lines = [
        f"Command: `{r['command']}`",
        "",
        f"Machine: {r['machine']}; {r['batch']} labeled + {r['batch']} x mu={r['mu']} unlabeled images per step "
        f"from memory-mapped uint8 .npy files; {r['rounds']} interleaved rounds of {r['steps_per_round']} "
        f"steps ({r['compute_steps_per_round']} for the compute bound); medians.",
        "",
    ]
    names = list(r["sizes"][0]["images_per_s"])
    header = "| path | " + " | ".join(f"{s['image_size']} px images/s | x old" for s in r["sizes"]) + " |"
    lines += [header, "|---" * (1 + 2 * len(r["sizes"])) + "|"]
    for name in names:
        cells = []
        for s in r["sizes"]:
            ratio = s["ratio_to_old"].get(name)
            shown = "1.00" if name == "old path" else "n/a" if name.startswith("compute") else f"{ratio:.2f}"
            cells += [f"{s['images_per_s'][name]:,.0f}", shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="batches per round and path")
    parser.add_argument("--compute-steps", type=int, default=1, help="steps per round of the compute bound")
    parser.add_argument("--batch", type=int, default=64, help="labeled images per step")
    parser.add_argument("--mu", type=float, default=1.0, help="unlabeled images per labeled one")
    parser.add_argument("--images-224", type=int, default=4000)
    parser.add_argument("--images-32", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training thread")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/batch_assembly")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = run(args)
    write_results(REPO / args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
