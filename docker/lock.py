"""Write the images' lock files (``make constraints``): every package each image installs, pinned.

Resolves ``.[cpu,cloud]`` (the object-store drivers too) with pip's resolver (``pip install --dry-run --report``, nothing is installed)
for this interpreter (Linux x86_64, Python 3.11), then writes

* ``docker/requirements-gpu.txt`` -- all of it, with the gpu extra's onnxruntime-gpu (the CUDA 13
  build that matches torch's CUDA 13.0 wheels) instead of onnxruntime;
* ``docker/requirements-cpu.txt`` -- the same without the CUDA packages (CPU-only torch needs none).

The Dockerfile installs these before it copies the code, so a code change rebuilds one small layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONNXRUNTIME_GPU = "1.31.1"
HEADER = """\
# Every package the {target} image installs, pinned: two builds of one commit install the same
# versions. Generated from pyproject.toml by `make constraints` (resolved for Linux x86_64,
# Python 3.11); do not edit by hand.
"""
CUDA_ONLY = ("nvidia-", "cuda-", "triton")  # torch's CUDA wheels' own dependencies


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), ".[cpu,cloud]"], cwd=ROOT, check=True)
        installed = json.loads(report.read_text())["install"]
    pins = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}
    pins.pop("kdpipe", None)
    gpu = {**{n: v for n, v in pins.items() if n != "onnxruntime"}, "onnxruntime-gpu": ONNXRUNTIME_GPU}
    cpu = {n: v for n, v in pins.items() if not n.startswith(CUDA_ONLY)}
    for target, chosen in (("cpu", cpu), ("gpu", gpu)):
        text = HEADER.format(target=target) + "".join(f"{n}=={v}\n" for n, v in sorted(chosen.items()))
        (ROOT / "docker" / f"requirements-{target}.txt").write_text(text)
        print(f"docker/requirements-{target}.txt: {len(chosen)} packages")


if __name__ == "__main__":
    main()
