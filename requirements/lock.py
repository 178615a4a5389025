"""Regenerate the images' lock files from pyproject.toml (`make lock`; uv, from the dev extra).

    image.in       the service's dependencies, as pyproject.toml lists them (written here)
    image.txt      their closure, pinned with every file's sha256: the cpu image's packages
    image-gpu.in   the same with onnxruntime-gpu in place of onnxruntime (written here)
    image-gpu.txt  their closure for the gpu image's Python (Ubuntu 24.04's 3.12)
    build.in       what the build stages use and the images do not hold: setuptools (to build the
                   cnnserve wheel) and cyclonedx-bom (the SBOM); kept by hand
    build.txt      its closure, with hashes

The Dockerfile installs each with `pip install --require-hashes`, so two builds a month apart
install the same files. The locks are universal (every platform, arm64 included) and resolved on
PyPI alone, whatever pip.conf says. tests/test_image.py fails when pyproject.toml and image.in
disagree, or a lock no longer pins what its .in asks for.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
INDEX = "https://pypi.org/simple"
GPU_RUNTIME = "onnxruntime-gpu>=1.27,<2"  # the CUDA 13 builds; the Dockerfile's CUDA_IMAGE carries CUDA 13
PYTHON = {"image": "3.11", "image-gpu": "3.12", "build": "3.11"}


def name_of(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def service_requirements() -> list[str]:
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def inputs() -> dict[str, list[str]]:
    service = service_requirements()
    gpu = [r for r in service if name_of(r) != "onnxruntime"] + [GPU_RUNTIME]
    return {"image": service, "image-gpu": gpu}


def main() -> None:
    for stem, requirements in inputs().items():
        (HERE / f"{stem}.in").write_text(
            "# written by requirements/lock.py from pyproject.toml's dependencies: edit those, then make lock\n"
            + "".join(f"{r}\n" for r in requirements)
        )
    for stem, python in PYTHON.items():
        command = [
            *(Path(sys.executable).parent / "uv", "pip", "compile"),
            f"requirements/{stem}.in",
            "--output-file",
            f"requirements/{stem}.txt",
            "--generate-hashes",
            "--universal",
            "--python-version",
            python,
            "--index-url",
            INDEX,
            "--no-config",
            "--quiet",
            "--custom-compile-command",
            "make lock",
            *sys.argv[1:],  # e.g. --upgrade
        ]
        subprocess.run([str(part) for part in command], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
