"""timing.py: the one timing routine of ``--throughput`` and the benchmark, and its settling of
page faults before the timed batches."""

from __future__ import annotations

import torch

import timing


def test_settling_runs_passes_over_all_candidates_until_one_faults_in_few_pages(monkeypatch):
    # Page faults per batch of a process whose heap is still growing, then has settled.
    faults_per_batch = iter([50_000, 50_000, 9_000, 9_000, 10, 30, 0, 0])
    counter = {"faults": 0}
    ran = []

    def step(name):
        def run():
            ran.append(name)
            counter["faults"] += next(faults_per_batch)

        return run

    monkeypatch.setattr(timing, "minor_page_faults", lambda: counter["faults"])
    passes, per_batch = timing.settle_page_faults([step("ours"), step("timm")], torch.device("cpu"), 5)
    assert (passes, per_batch) == (3, 20.0)  # the third pass averaged 20 faults per batch
    assert ran == ["ours", "timm"] * 3


def test_settling_stops_at_its_cap_and_does_nothing_off_the_cpu_or_when_off(monkeypatch):
    counter = {"faults": 0}

    def step():
        counter["faults"] += 12_288  # a fresh 48 MiB buffer every batch: never quiet

    monkeypatch.setattr(timing, "minor_page_faults", lambda: counter["faults"])
    assert timing.settle_page_faults([step], torch.device("cpu"), 4) == (4, 12_288.0)
    assert counter["faults"] == 4 * 12_288
    assert timing.settle_page_faults([step], torch.device("cuda"), 4) == (0, None)
    assert timing.settle_page_faults([step], torch.device("cpu"), 0) == (0, None)
    assert counter["faults"] == 4 * 12_288


def test_a_real_step_that_reuses_its_buffers_settles_in_one_pass():
    buffer = torch.zeros(1 << 20)
    assert timing.settle_page_faults([lambda: buffer.add_(1.0)], torch.device("cpu"), 5)[0] == 1


def test_timed_batches_start_after_the_page_faults_stop(monkeypatch):
    faults_per_batch = iter([30_000] * 3 + [20_000, 5_000, 0] + [0] * 10)
    counter = {"faults": 0, "calls": 0}

    def step():
        counter["calls"] += 1
        counter["faults"] += next(faults_per_batch)

    monkeypatch.setattr(timing, "minor_page_faults", lambda: counter["faults"])
    t = timing.time_images_per_second(step, 4, torch.device("cpu"), warmup=3, iters=5, settle=5)
    # 3 warm-up batches, then 3 settling ones (20k, 5k, 0 faults), then the 5 timed ones.
    assert (t.settle_passes, t.iters, counter["calls"]) == (3, 5, 11)
    assert t.images_per_s > 0
    assert timing.time_images_per_second(step, 4, torch.device("cpu"), warmup=0, iters=2).settle_passes == 0
