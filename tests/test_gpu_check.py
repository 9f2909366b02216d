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


def test_a_step_past_its_limit_is_killed_with_its_children_and_its_log_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    # The step starts a grandchild (as inductor's compile workers are) that would outlive a plain kill.
    marker = tmp_path / "grandchild-ran-on"
    grandchild = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    script = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    result = gpu_check.run_step("slow", [sys.executable, "-c", script], 1.5, str(tmp_path))
    assert result["status"] == "timed out after 2 s" and result["seconds"] < 10
    assert (tmp_path / "slow.log").read_text().strip() == "started"
    import time

    time.sleep(3.5)
    assert not marker.exists(), "the step's child process survived the time-out"


def test_a_step_without_time_left_is_skipped_not_started(tmp_path):
    result = gpu_check.run_step("late", [sys.executable, "-c", "raise SystemExit(3)"], 1.0, str(tmp_path))
    assert result["status"] == "skipped: deadline" and not (tmp_path / "late.log").exists()


def test_a_failing_step_reports_its_exit_code_and_output(tmp_path):
    cmd = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    result = gpu_check.run_step("bad", cmd, 30, str(tmp_path))
    assert result["status"] == "failed (exit 3)" and result["tail"].strip() == "boom"


def test_the_published_peak_tells_pcie_and_nvl_cards_from_their_sxm_namesakes():
    assert gpu_check.published_bf16_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.published_bf16_peak("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.published_bf16_peak("NVIDIA H200") == 989.0
    assert gpu_check.published_bf16_peak("NVIDIA H200 NVL") == 835.0
    assert gpu_check.published_bf16_peak("Tesla T4") is None  # the measured product stands in
