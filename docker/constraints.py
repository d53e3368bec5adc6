"""Write docker/constraints.txt: every package the images install, pinned (``make constraints``).

Resolves ``.[cpu]`` with pip's resolver (``pip install --dry-run --report``, nothing is installed)
for this interpreter (Linux x86_64, Python 3.11), and adds the gpu extra's onnxruntime-gpu, whose
version must be the CUDA 13 build that matches torch's CUDA 13.0 wheels.
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
# Pinned versions of every package the images install (pip --constraint): two builds of one
# commit install the same versions. Generated from pyproject.toml by `make constraints`
# (resolved for Linux x86_64, Python 3.11); do not edit by hand.
# onnxruntime-gpu: the gpu extra, the CUDA 13 build that matches torch 2.14.1's CUDA 13.0 wheels.
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), ".[cpu]"], cwd=ROOT, check=True)
        installed = json.loads(report.read_text())["install"]
    pins = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installed}
    pins.pop("kdpipe", None)
    pins["onnxruntime-gpu"] = ONNXRUNTIME_GPU
    text = HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    (ROOT / "docker" / "constraints.txt").write_text(text)
    print(f"docker/constraints.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
