"""Pipeline overhead: what DVC costs when nothing changed, and what a whole run costs.

    .venv/bin/python -m benchmarks.pipeline_overhead            # no-op `dvc repro` and `make repro`
    .venv/bin/python -m benchmarks.pipeline_overhead --forced   # + `dvc repro --force` (reruns all stages)

Run it after `make repro` (the pipeline must be up to date). Times are medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_results

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _timed(cmd: list[str], repeats: int) -> tuple[float, str]:
    times, output = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-2000:]}")
    return statistics.median(times), output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forced", action="store_true", help="also time `dvc repro --force` (minutes)")
    parser.add_argument("--out", default="benchmarks/results/pipeline_overhead")
    args = parser.parse_args(argv)
    result: dict[str, float | str] = {}
    noop, output = _timed([str(BIN / "dvc"), "repro"], args.repeats)
    if "up to date" not in output:
        print("the pipeline was not up to date: run `make repro` first", file=sys.stderr)
        return 2
    result["dvc repro (no-op) s"] = noop
    result["dvc status s"] = _timed([str(BIN / "dvc"), "status"], args.repeats)[0]
    result["make repro (no-op) s"] = _timed(["make", "repro"], args.repeats)[0]
    if args.forced:
        result["dvc repro --force (all stages, demo data) s"] = _timed(
            [str(BIN / "dvc"), "repro", "--force"], 1
        )[0]
    lines = ["| measurement | seconds |", "| --- | --- |"] + [
        f"| {k[:-2]} | {v:.2f} |" for k, v in result.items()
    ]
    write_results(REPO / args.out, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
