"""Write a CycloneDX 1.5 SBOM (JSON) of an image's Python packages, from its lock file.

The images install exactly ``docker/requirements-{cpu,gpu}.txt`` (plus kdpipe itself), so the lock
file is the list of what each image holds; the release attaches ``sbom-<target>.cdx.json`` to the
GitHub release. The Debian packages of the base image are not in it (syft on the built image would
add them).

    python docker/sbom.py cpu 0.1.0 > sbom-cpu.cdx.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins(target: str) -> dict[str, str]:
    lines = (ROOT / "docker" / f"requirements-{target}.txt").read_text(encoding="utf-8").splitlines()
    return dict(line.strip().split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def component(name: str, version: str) -> dict[str, str]:
    return {
        "type": "library",
        "name": name,
        "version": version,
        "purl": f"pkg:pypi/{name}@{version}",
        "bom-ref": f"pkg:pypi/{name}@{version}",
    }


def sbom(target: str, kdpipe_version: str) -> dict:
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "component": {"type": "container", "name": f"kdpipe-{target}", "version": kdpipe_version}
        },
        "components": [component("kdpipe", kdpipe_version)]
        + [component(name, version) for name, version in sorted(pins(target).items())],
    }


if __name__ == "__main__":
    target, version = sys.argv[1], sys.argv[2]
    if target not in ("cpu", "gpu"):
        sys.exit(f"sbom.py: target {target!r}: expected cpu or gpu")
    json.dump(sbom(target, version), sys.stdout, indent=2)
    sys.stdout.write("\n")
