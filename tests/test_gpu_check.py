"""scripts/gpu_check.py, the one-command GPU check: what it does where there is no GPU, and the
figures it reports (MFU from images/s and the GPU's bf16 peak)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device on this machine; nothing to check (run it where a GPU is)"
    ]
    assert not (tmp_path / "out").exists()


def test_mfu_is_images_per_second_times_flops_over_the_bf16_peak():
    bench = {
        "rows": [
            {
                "phase": "forward",
                "dtype": "bf16",
                "mode": "eager",
                "ours_img_s": 5000.0,
                "timm_img_s": 4000.0,
                "ratio": 1.25,
            },
            {
                "phase": "train",
                "dtype": "bf16",
                "mode": "compiled",
                "ours_img_s": 2000.0,
                "timm_img_s": None,
                "ratio": None,
            },
        ]
    }
    rows = gpu_check.mfu_rows(bench, "swin_tiny", peak_tflops=989.0)
    # Swin-T: 4.49 GMACs = 8.98 GFLOP per forward; a training step is 3 forwards' worth.
    assert rows[0]["mfu"] == pytest.approx(5000 * 8.98 / 1e3 / 989.0)
    assert rows[1]["mfu"] == pytest.approx(2000 * 3 * 8.98 / 1e3 / 989.0)
    table = gpu_check.markdown(
        {
            "machine": {"gpu": "NVIDIA H200"},
            "benchmark": rows,
            "steps": [{"step": "cuda-tests", "status": "ok", "seconds": 12.5}],
        }
    )
    assert "| swin_tiny | forward | bf16 | eager | 5000.0 | 4000.0 | 1.25 | 4.5% |" in table
    assert "| swin_tiny | train | bf16 | compiled | 2000.0 | - | - | 5.4% |" in table
    assert "| cuda-tests | ok | 12.5 |" in table and "NVIDIA H200" in table
