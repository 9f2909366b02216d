"""Shared fixtures: the demo dataset (written once per session) and a tiny Swin config."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
DEMO_CFG = os.path.join(ROOT, "configs", "demo", "swin_demo_digits.yaml")
# Child processes: one intra-op thread each (ranks side by side on 2 cores, the same kernels in
# every run) and unbuffered output.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# A tiny, deterministic run of the demo config (embed 16, 32x32, one epoch, fp32, no loader
# workers, no colour jitter or drop path), for the tests that run main.py end to end.
TINY_RUN_OPTS = [
    *("DATA.IMG_SIZE", "32", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]"),
    *("MODEL.SWIN.DEPTHS", "[2,2,2,2]", "DATA.NUM_WORKERS", "0", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"),
    *("AUG.COLOR_JITTER", "0.0", "MODEL.DROP_PATH_RATE", "0.0", "AMP_ENABLE", "False"),
]


def worker_cores() -> int:
    """The cores this test process may keep busy: all of the machine's, or under pytest-xdist
    (``make test`` runs ``-n auto``) this worker's share of them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def threads_env() -> dict:
    """Environment for a child that may use this process's cores: one intra-op thread per core."""
    return {"OMP_NUM_THREADS": str(worker_cores()), "MKL_NUM_THREADS": str(worker_cores())}


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker, and every child it starts, uses only its share of the cores
    as intra-op threads: two workers on 2 cores with two threads each would oversubscribe OpenMP,
    which slows every process several-fold."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    os.environ.update(threads_env())
    import torch

    torch.set_num_threads(worker_cores())


def subprocess_env() -> dict:
    """This environment plus ``SUBPROCESS_ENV``, without an outer launcher's variables: a child
    main.py must never join the process group of a torchrun that runs the tests."""
    env = {**os.environ, **SUBPROCESS_ENV}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def demo_args(
    data: str, output, *extra: str, tag: str | None = None, batch: int = 16, opts: tuple | list = ()
) -> list[str]:
    """main.py's arguments for a tiny CPU run of the demo config: ``extra`` options, then
    ``--opts`` with ``TINY_RUN_OPTS`` and ``opts`` (later keys win)."""
    tagged = ["--tag", tag] if tag else []
    return [
        *("--cfg", DEMO_CFG, "--data-path", data, "--output", str(output), *tagged),
        *("--batch-size", str(batch), "--device", "cpu", *extra, "--opts", *TINY_RUN_OPTS, *opts),
    ]


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


@pytest.fixture(autouse=True)
def _release_log_handlers():
    """In-process runs of main.py attach file/console handlers to the 'swin' and root loggers;
    drop them after each test so the next one's output is its own."""
    yield
    import logger as logger_module

    for lg in (logging.getLogger("swin"), logging.getLogger()):
        for h in [h for h in lg.handlers if getattr(h, logger_module._OWNED, False)]:
            lg.removeHandler(h)
            h.close()


@pytest.fixture(autouse=True)
def kept_memory_calls(monkeypatch) -> list[bool]:
    """In-process training, --eval, --throughput or predict runs on the CPU would make this process
    keep every freed block for the rest of the suite (``allocator.keep_process_memory``); record
    the calls instead (``large_blocks`` of each). Child processes check the real effect
    (tests/test_inference.py, tests/test_data.py)."""
    import allocator

    calls: list[bool] = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda large_blocks=False: calls.append(large_blocks) or True)
    return calls


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


def read_sample(dataset, key):
    """``dataset[key]`` (the image as ``float_images`` gives it) and the name the dataset logged as
    unreadable while reading it ("" if none): ``(image, target, replaced)``."""
    from data.robust import unreadable_names

    dataset.replacements.clear()
    image, target = dataset[key]
    names = unreadable_names(dataset)
    return float_images(image), target, names[0] if names else ""


def float_images(x):
    """What the model is given for ``x``: a fast-pipeline ``Uint8Image`` or ``Uint8Batch``
    normalised (and erased) on the CPU, also inside a tuple or list (SimMIM's (image, mask));
    anything else as it is."""
    from data.uint8_batches import Uint8Batch, Uint8Image

    if isinstance(x, (tuple, list)):
        return type(x)(float_images(item) for item in x)
    if isinstance(x, Uint8Image):
        return x.normalized()
    if isinstance(x, Uint8Batch):
        return x.to("cpu")
    return x
