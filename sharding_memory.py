"""Per-rank memory and step time of a training step under DDP and under FSDP, on CPU ranks (gloo).

``scripts/benchmark.py --memory --ranks 2`` runs it: for each model, one fresh group of N
processes per mode (so each process's memory is that configuration's alone), a few fp32 training
steps (forward, cross-entropy, backward, clipping, AdamW) on random images, then per rank:

* the elements of parameters, gradients and optimizer state this rank holds, from the local
  tensors (a shard under FSDP, everything under DDP), as MiB and as a share of the model's;
* the peak resident set size during the steps (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` once the model, optimizer and first step exist; the process-lifetime
  ``ru_maxrss`` where that is unavailable), and the RSS before the steps;
* the median wall time of a step after the first.

Glibc's allocator is told to return large blocks to the system at once
(``MALLOC_MMAP_THRESHOLD_``), so that RSS follows the memory in use rather than what the heap
kept from model building. Every rank uses one thread.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import tempfile
import time
from typing import Any

import torch

MODES = ("ddp", "fsdp")


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _local_elements(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)


def _rank_main(rank: int, world_size: int, port: int, cfg: str, opts: list[str], mode: str, steps: int, out: str):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from config import get_config
    from distributed import cleanup, init_distributed, wrap_ddp
    from fsdp import count_elements, same_initial_weights, shard_model
    from models import build_model
    from optimizer import build_optimizer

    env = init_distributed("cpu")
    config = get_config(cfg, opts)
    with same_initial_weights(0):
        model = build_model(config)
    total_params = sum(p.numel() for p in model.parameters())
    if mode == "fsdp":
        shard_model(model, env)
    else:
        model = wrap_ddp(model, env.device)
    optimizer = build_optimizer(config, model)
    size, batch = config.DATA.IMG_SIZE, config.DATA.BATCH_SIZE
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, config.MODEL.NUM_CLASSES, (batch,), generator=g)
    criterion = torch.nn.CrossEntropyLoss()
    times, grads, rss_before, peak_reset = [], 0, None, False
    for i in range(steps):
        if i == 1:  # after the first step: optimizer state allocated, caches built
            rss_before = _status_mib("VmRSS")
            peak_reset = _reset_peak_rss()
        start = time.perf_counter()
        loss = criterion(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        grads = _local_elements(p.grad for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = _status_mib("VmHWM") if peak_reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _, local_params = count_elements(model)
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    result = {
        "rank": rank,
        "mode": mode,
        "world_size": world_size,
        "total_params": total_params,
        "params": local_params,
        "grads": grads,
        "optimizer_state": _local_elements(state_tensors),
        "rss_before_steps_mib": rss_before,
        "peak_rss_mib": peak,
        "peak_method": "VmHWM over the steps" if peak_reset else "ru_maxrss (process lifetime)",
        "step_s": statistics.median(times[1:] or times),
    }
    with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cfg: str, opts: list[str], mode: str, world_size: int = 2, steps: int = 3) -> list[dict[str, Any]]:
    """Run ``steps`` training steps of the model of config ``cfg`` (+ ``opts``) on ``world_size``
    fresh CPU processes under ``mode`` ('ddp' or 'fsdp'); returns one result dict per rank."""
    import torch.multiprocessing as mp

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    # Children inherit these: large blocks mapped and unmapped at once, RSS = memory in use.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_main,
            args=(world_size, _free_port(), cfg, opts, mode, steps, out),
            nprocs=world_size,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out, f"{mode}_rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def table(rows: list[dict[str, Any]]) -> str:
    """The results as a text table, one line per (model, mode, rank): MiB and % of the model."""
    mib = 4 / 2**20  # fp32 elements
    lines = [
        f"{'model':12s} {'mode':5s} {'rank':>4s} {'params MiB (%)':>16s} {'grads MiB (%)':>16s} "
        f"{'AdamW state MiB (%)':>20s} {'RSS before':>10s} {'peak RSS':>9s} {'step s':>7s}"
    ]
    for r in rows:
        n = r["total_params"]

        def cell(k: str, full: int, width: int, r=r) -> str:
            return f"{r[k] * mib:,.0f} ({100 * r[k] / full:.0f}%)".rjust(width)

        lines.append(
            f"{r['model']:12s} {r['mode']:5s} {r['rank']:>4d} {cell('params', n, 16)} {cell('grads', n, 16)} "
            f"{cell('optimizer_state', 2 * n, 20)} {r['rss_before_steps_mib'] or 0:>10,.0f} "
            f"{r['peak_rss_mib']:>9,.0f} {r['step_s']:>7.2f}"
        )
    return "\n".join(lines)
