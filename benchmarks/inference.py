"""Inference benchmark: the exported model in onnxruntime vs torch eager, INT8 vs fp32.

Reads the pipeline's outputs (run `make repro` first):
    artifacts/selected/model.pt    the chosen torch checkpoint
    artifacts/export/model.onnx    its fp32 ONNX export (+ model.int8.onnx when shipped)
    artifacts/prepared/test_*.npy  the test split

All engines are timed in ONE process, in interleaved rounds (torch, ORT fp32, ORT INT8, then
again), so background load on a shared machine hits them alike; ratios are computed per round and
the median ratio is reported. Accuracy of each engine is measured on the full test split.

    .venv/bin/python -m benchmarks.inference [--rounds 5] [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import cpu_description, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _time_calls(call, runs: int) -> float:
    """Median milliseconds per call after a short warm-up."""
    for _ in range(max(3, runs // 10)):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def _engines(selected: Path, export: Path, threads: int):
    import onnxruntime as ort
    import torch

    from kdpipe.training import checkpoints

    torch.set_num_threads(threads)
    model, _ = checkpoints.load_model(selected / "model.pt")
    model.eval()

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    engines = {"torch eager fp32": torch_run}
    for name, file in (("onnxruntime fp32", "model.onnx"), ("onnxruntime int8", "model.int8.onnx")):
        if (export / file).is_file():
            session = ort.InferenceSession(str(export / file), opts, providers=["CPUExecutionProvider"])
            engines[name] = (lambda s: lambda x: s.run(None, {s.get_inputs()[0].name: x})[0])(session)
    return engines


def run(args) -> dict:
    from kdpipe.data.prepared import load_prepared
    from kdpipe.export.onnx import to_model_input

    data = load_prepared(REPO / args.prepared)
    engines = _engines(REPO / args.selected, REPO / args.export, args.threads)
    x_test = to_model_input(np.asarray(data.test_x))
    accuracy = {}
    for name, call in engines.items():
        logits = np.concatenate([call(x_test[i : i + 256]) for i in range(0, len(x_test), 256)])
        accuracy[name] = float((logits.argmax(1) == np.asarray(data.test_y)).mean())
    rounds: dict[str, dict[int, list[float]]] = {name: {1: [], 64: []} for name in engines}
    for _ in range(args.rounds):
        for batch in (1, 64):
            x = np.ascontiguousarray(np.resize(x_test, (batch, *x_test.shape[1:])))
            for name, call in engines.items():
                rounds[name][batch].append(
                    _time_calls(lambda c=call, x=x: c(x), args.runs if batch == 1 else args.runs // 4)
                )
    return {
        "machine": f"{cpu_description()}, {args.threads} threads",
        "python": sys.version.split()[0],
        "model": f"{args.export}/model.onnx",
        "test_images": int(len(x_test)),
        "accuracy": accuracy,
        "latency_ms": {
            name: {str(b): statistics.median(v) for b, v in per.items()} for name, per in rounds.items()
        },
        "ratios": _ratios(rounds),
        "rounds": args.rounds,
        "runs_per_round": args.runs,
    }


def _ratios(rounds) -> dict[str, float]:
    """Median over rounds of per-round speed-up ratios (same round = same machine load)."""
    out = {}
    pairs = [("onnxruntime fp32", "torch eager fp32"), ("onnxruntime int8", "onnxruntime fp32")]
    for fast, slow in pairs:
        if fast in rounds and slow in rounds:
            for batch in (1, 64):
                per_round = [s / f for f, s in zip(rounds[fast][batch], rounds[slow][batch], strict=True)]
                out[f"{slow} / {fast} time, batch {batch}"] = statistics.median(per_round)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; {result['test_images']} test images; "
        f"{result['rounds']} interleaved rounds.",
        "",
        "| engine | test accuracy | latency batch 1 (ms) | latency batch 64 (ms) |",
        "| --- | --- | --- | --- |",
    ]
    for name, acc in result["accuracy"].items():
        lat = result["latency_ms"][name]
        lines.append(f"| {name} | {acc:.4f} | {lat['1']:.3f} | {lat['64']:.3f} |")
    lines += ["", "| speed-up (median of per-round ratios) | × |", "| --- | --- |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepared", default="artifacts/prepared")
    parser.add_argument("--selected", default="artifacts/selected")
    parser.add_argument("--export", default="artifacts/export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200, help="timed calls per engine per round at batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/inference")
    args = parser.parse_args(argv)
    if not (REPO / args.export / "model.onnx").is_file():
        print(f"no exported model in {args.export}: run `make repro` first", file=sys.stderr)
        return 2
    result = run(args)
    write_results(REPO / args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
