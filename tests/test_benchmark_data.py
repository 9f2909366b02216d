"""scripts/benchmark_data.py end to end on a tiny set: JSON keys, positive rates, the printed table."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark_data.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark_data  # noqa: E402


def test_paired_timing_gives_each_pipeline_the_same_draws_for_each_image():
    seen: dict[str, list] = {"reference": [], "fast": []}

    def record(name):
        return lambda path: seen[name].append((path, random.random(), torch.rand(1).item()))

    paths = [f"image_{i}.jpg" for i in range(60)]
    ms = benchmark_data.paired_ms_per_image({n: record(n) for n in seen}, paths, seed=3, chunk=25)
    assert set(ms) == {"reference", "fast"} and all(v > 0 for v in ms.values())
    assert seen["reference"] == seen["fast"]  # same image, same seed, same draws
    assert [p for p, _, _ in seen["fast"]] == paths
    assert len({r for _, r, _ in seen["fast"]}) == 60  # a different seed for each image


def test_benchmark_data_tiny_run(tmp_path):
    out_json = tmp_path / "bench.json"
    args = ["--images", "16", "--sizes", "64x48", "--rounds", "1", "--out", str(tmp_path / "data")]
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args, "--json", str(out_json)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout

    results = json.loads(out_json.read_text())
    assert set(results) >= {"machine", "settings", "sizes", "goal"}
    assert set(results["machine"]) >= {"cpu", "isa", "cores", "load_average", "load_average_after"}
    assert set(results["machine"]["isa"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert list(results["sizes"]) == ["64x48"]
    size = results["sizes"]["64x48"]
    assert size["images"]["train"] == 16 and size["images"]["val"] == 4
    assert os.path.isfile(tmp_path / "data" / "64x48" / "zip" / "train.zip")
    assert os.path.isfile(tmp_path / "data" / "64x48" / "shards" / "train" / "shards.json")

    transform = size["transform"]
    for name in ("reference", "fast", "val reference", "val fast"):
        assert transform[name]["images_per_s_per_core"] > 0
        assert transform[name]["ms_per_image"] > 0
    assert transform["ratio"] > 0 and transform["val_ratio"] > 0
    common = {"read + decode", "crop + resize", "RandAugment"}
    assert set(transform["stages"]["reference"]) == common | {"flip", "to-tensor + normalise", "random erasing"}
    assert set(transform["stages"]["fast"]) == common | {"to uint8 + erasing draws"}  # the flip is in the crop
    for pipeline in ("reference", "fast"):
        assert all(ms > 0 for ms in transform["stages"][pipeline].values())
        assert transform["batch step"][pipeline]["ms_per_image"] > 0
    assert transform["ratio_with_batch_step_on_cpu"] > 0 and transform["val_ratio_with_batch_step_on_cpu"] > 0

    rows = size["loader"]
    assert {(r["format"], r["workers"], r["pipeline"]) for r in rows} == {
        (f, w, p) for f in ("folder", "zip", "shards") for w in (0, 1, 2) for p in ("reference", "fast")
    }
    for row in rows:
        assert row["images_per_s"] > 0 and row["images_per_s_per_core"] > 0
        assert row["images"] == 16  # one epoch, batch size capped at the 16 images

    goal = results["goal"]
    assert goal["target"] == 2.0 and isinstance(goal["met"], bool)
    assert set(goal["ratios"]) == {"64x48 train", "64x48 val"}

    # The printed report: machine line, the per-size tables and the goal verdict.
    assert "cpu: " in text and "avx512f" in text and "load average" in text
    assert "== 64x48: 16 train / 4 val JPEGs" in text
    for stage in (
        "read + decode",
        "RandAugment",
        "random erasing",
        "whole train transform",
        "batch step",
        "val transform",
    ):
        assert stage in text
    for fmt in ("folder", "zip", "shards"):
        assert any(line.split()[:2] == [fmt, "2"] for line in text.splitlines())
    assert "goal: >= 2x" in text and ("NOT MET" in text or "MET" in text)


def test_a_reused_out_folder_is_rebuilt_when_the_image_count_changes(tmp_path):
    """The scratch images and layouts of another --images are not timed as if they were these."""
    root = str(tmp_path / "8x8")
    for n_train, n_val in ((8, 4), (4, 4)):
        benchmark_data.fresh_scratch(root, {"size": [8, 8], "images": n_train, "val_images": n_val})
        benchmark_data.make_image_folder(os.path.join(root, "folder"), (8, 8), n_train, n_val)
        paths = benchmark_data.write_layouts(root)
        assert len(benchmark_data.image_paths(os.path.join(paths["folder"], "train"))) == n_train
        with open(os.path.join(paths["shards"], "train", "shards.json")) as f:
            assert json.load(f)["samples"] == n_train
