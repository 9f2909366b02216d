"""Shared fixtures: the demo dataset (written once per session) and a tiny Swin config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, "configs", "demo", "swin_demo_digits.yaml")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The digits ImageFolder that `make demo` trains on, written by the real script."""
    out = tmp_path_factory.mktemp("digits") / "demo_data"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "prepare_demo_data.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return str(out)


@pytest.fixture(scope="session")
def small_data(demo_data: str, tmp_path_factory) -> str:
    """10 classes x 8 train images and 15 (odd) val images copied from the demo dataset."""
    dst = tmp_path_factory.mktemp("small") / "data"
    for split, per_class in (("train", 8), ("val", None)):
        for c in sorted(os.listdir(os.path.join(demo_data, split))):
            os.makedirs(dst / split / c)
            names = sorted(os.listdir(os.path.join(demo_data, split, c)))
            for name in names[: per_class or (2 if int(c) < 5 else 1)]:
                shutil.copy(os.path.join(demo_data, split, c, name), dst / split / c / name)
    return str(dst)


def run_main(
    args: list[str], cwd: str | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run main.py as a user would; returns the completed process (stdout+stderr captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
