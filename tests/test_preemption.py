"""Checkpoint round trip, auto-resume and pre-emption of real ``main.py`` runs (CPU, tiny Swin).

Every test trains the demo architecture scaled down (embed 16, 32x32 inputs) on 80 digits
(10 classes x 8) in subprocesses, as a user or a cluster scheduler would run and signal it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_CFG, MAIN, TINY_RUN_OPTS, demo_args, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "swin_demo_digits"
BATCH = 16  # 80 train images -> 5 optimizer steps per epoch
TINY_OPTS = [*TINY_RUN_OPTS, "TRAIN.EPOCHS", "2"]  # later keys win


def _cmd(data: str, output: Path, tag: str, *opts: str) -> list[str]:
    return [sys.executable, MAIN, *demo_args(data, output, tag=tag, batch=BATCH, opts=("TRAIN.EPOCHS", "2", *opts))]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _load(path: Path) -> dict:
    # Every checkpoint must load without unpickling code.
    return torch.load(path, map_location="cpu", weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _start_until(cmd: list[str], marker: str, timeout: float = 240) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` and read its output until a line contains ``marker``; returns the process and lines."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert proc.stdout is not None
    timer = threading.Timer(timeout, proc.kill)  # never hang the suite if the marker never comes
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                return proc, lines
    finally:
        timer.cancel()
    proc.wait()
    raise AssertionError(f"{marker!r} never appeared (exit {proc.returncode}):\n" + "".join(lines[-40:]))


@pytest.mark.slow
def test_rerun_with_more_epochs_resumes_at_the_next_epoch_from_a_weights_only_checkpoint(
    small_data: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / MODEL_NAME / "grow"
    first = _run(_cmd(small_data, tmp_path, "grow", "TRAIN.EPOCHS", "1"))
    assert "Train: [0/1][4/5]" in first.stdout

    config_text = (run_dir / "config.yaml").read_text()
    assert yaml.safe_load(config_text)["TRAIN"]["EPOCHS"] == 1
    ckpt = _load(run_dir / "ckpt_epoch_0.pth")
    assert (ckpt["epoch"], ckpt["step"], ckpt["sampler"]["batch_in_epoch"]) == (0, 5, 0)
    assert (ckpt["nonfinite_in_row"], ckpt["nonfinite_total"]) == (0, 0)  # the skipped-step counts go on
    assert isinstance(ckpt["config"], str)
    stored = yaml.safe_load(ckpt["config"])
    assert stored["MODEL"]["SWIN"]["EMBED_DIM"] == 16 and stored["MODEL"]["NUM_CLASSES"] == 10
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "rng", "max_accuracy"}

    second = _run(_cmd(small_data, tmp_path, "grow", "TRAIN.EPOCHS", "2"))
    assert "resuming at epoch 1, batch 0 (optimizer step 5)" in second.stdout
    assert "Train: [0/2]" not in second.stdout  # epoch 0 is not trained again
    assert "Train: [1/2][4/5]" in second.stdout
    assert f"saved {run_dir / 'ckpt_epoch_1.pth'}" in second.stdout
    resumed = _load(run_dir / "ckpt_epoch_1.pth")
    assert (resumed["epoch"], resumed["step"]) == (1, 10)
    assert yaml.safe_load(resumed["config"])["TRAIN"]["EPOCHS"] == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["TRAIN"]["EPOCHS"] == 2
    # Epoch 1 really trained on top of epoch 0, and last.pth points at the newest epoch.
    assert _max_diff(resumed["model"], ckpt["model"]) > 0
    assert torch.equal(_load(run_dir / "last.pth")["model"]["head.weight"], resumed["model"]["head.weight"])


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_a_step_checkpoint_and_exits_0(small_data: str, tmp_path: Path) -> None:
    cmd = _cmd(small_data, tmp_path, "term", "TRAIN.EPOCHS", "50", "PRINT_FREQ", "1")
    proc, lines = _start_until(cmd, "Train: [0/50][0/5]")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-4000:]

    run_dir = tmp_path / MODEL_NAME / "term"
    assert "received SIGTERM: finishing this step, then saving a checkpoint and exiting" in output
    assert f"after SIGTERM: checkpoint written to {run_dir}; run the same command again to continue" in output
    assert "Traceback" not in output
    ckpt = _load(run_dir / "ckpt_step.pth")
    batch = ckpt["sampler"]["batch_in_epoch"]
    # Stopped at a step boundary inside epoch 0, soon after the signal, with a consistent state.
    assert ckpt["epoch"] == 0 and 1 <= batch < 5
    assert ckpt["step"] == batch
    assert f"stopped at epoch 0, batch {batch}/5" in output
    assert f"step checkpoint: {run_dir / 'ckpt_step.pth'} (epoch 0, batch {batch})" in output
    assert not list(run_dir.glob("ckpt_epoch_*.pth"))


@pytest.mark.slow
def test_sigkill_after_a_step_checkpoint_then_rerun_ends_with_the_uninterrupted_weights(
    small_data: str, tmp_path: Path
) -> None:
    # Augmentation stays on: random crop + flip and random erasing in two loader workers (seeded
    # per sample), Mixup/CutMix (NumPy RNG) and drop path (torch RNG) in the main process.
    # Exactness needs the main RNG states restored and the workers' augmentation independent of
    # where the epoch (re)started.
    opts = (
        "TRAIN.EPOCHS",
        "2",
        "TRAIN.STEP_SAVE_FREQ",
        "2",
        "PRINT_FREQ",
        "1",
        "AUG.MIXUP",
        "0.8",
        "AUG.CUTMIX",
        "1.0",
        "AUG.REPROB",
        "0.25",
        "MODEL.DROP_PATH_RATE",
        "0.1",
        "DATA.NUM_WORKERS",
        "2",
    )
    reference_log = open(tmp_path / "reference.log", "w")
    reference = subprocess.Popen(
        _cmd(small_data, tmp_path, "reference", *opts),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=reference_log,
        stderr=subprocess.STDOUT,
    )
    try:
        victim_cmd = _cmd(small_data, tmp_path, "victim", *opts)
        victim, lines = _start_until(victim_cmd, "step checkpoint:")
        victim.kill()  # SIGKILL: no handler runs, nothing more is written
        victim.communicate(timeout=60)
        assert victim.returncode == -signal.SIGKILL
        killed_at = re.search(r"\(epoch (\d+), batch (\d+)\)", lines[-1])
        assert killed_at is not None, lines[-1]

        resumed = _run(victim_cmd)
        found = re.search(r"resuming at epoch (\d+), batch (\d+) \(optimizer step (\d+)\)", resumed.stdout)
        assert found is not None, resumed.stdout[-3000:]
        epoch, batch, step = map(int, found.groups())
        # Resumed mid-epoch from the step checkpoint (or a later one, if the kill landed late).
        assert batch > 0 and (epoch, batch) >= tuple(map(int, killed_at.groups()))
        assert step == epoch * 5 + batch
    finally:
        reference.wait(timeout=300)
        reference_log.close()
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-4000:]

    ref = _load(tmp_path / MODEL_NAME / "reference" / "last.pth")
    got = _load(tmp_path / MODEL_NAME / "victim" / "last.pth")
    assert (got["epoch"], got["step"]) == (ref["epoch"], ref["step"]) == (1, 10)
    diff = _max_diff(got["model"], ref["model"])
    assert diff <= 1e-6, f"resumed run's weights differ from the uninterrupted run's by {diff:.3g}"
    assert got["max_accuracy"] == ref["max_accuracy"]


# Runs main.py as torchrun's worker; on the first attempt rank 0 dies by SIGKILL right after
# writing its first step checkpoint, as a lost node would. Later attempts run main.py unchanged.
ELASTIC_WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import main

if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "0":
    write = main.save_step_checkpoint

    def write_then_die(*args, **kwargs):
        path = write(*args, **kwargs)
        print("injected failure: SIGKILL after writing", path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    main.save_step_checkpoint = write_then_die
sys.exit(main.main())
"""


@pytest.mark.slow
def test_torchrun_max_restarts_restarts_the_group_after_a_killed_rank_and_ends_with_the_uninterrupted_weights(
    small_data: str, tmp_path: Path
) -> None:
    worker = tmp_path / "elastic_worker.py"
    worker.write_text(ELASTIC_WORKER.format(root=str(ROOT)))
    # 2 ranks x batch 8 over 80 images: 5 steps per epoch; a step checkpoint every 2 steps.
    opts = (
        "TRAIN.EPOCHS",
        "2",
        "TRAIN.STEP_SAVE_FREQ",
        "2",
        "PRINT_FREQ",
        "1",
        "AUG.REPROB",
        "0.25",
        "MODEL.DROP_PATH_RATE",
        "0.1",
        "DATA.NUM_WORKERS",
        "1",
    )

    def launch(script: str, tag: str, *extra: str) -> list[str]:
        cmd = _cmd(small_data, tmp_path, tag, *opts)
        cmd[cmd.index("--batch-size") + 1] = "8"
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *extra,
            script,
            *cmd[2:],
        ]

    reference = subprocess.Popen(
        launch(MAIN, "reference"),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        elastic = subprocess.run(
            launch(str(worker), "elastic", "--max-restarts=1", "--monitor-interval=0.5"),
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        reference_out, _ = reference.communicate(timeout=400)
    output = elastic.stdout + elastic.stderr
    assert reference.returncode == 0, reference_out[-4000:]
    assert elastic.returncode == 0, output[-4000:]

    run_dir = tmp_path / MODEL_NAME / "elastic"
    assert f"injected failure: SIGKILL after writing {run_dir / 'ckpt_step.pth'}" in output
    # The second attempt found the step checkpoint by itself and continued mid-epoch.
    assert "resuming at epoch 0, batch 2 (optimizer step 2)" in output
    assert "Train: [1/2][4/5]" in output
    ref = _load(tmp_path / MODEL_NAME / "reference" / "last.pth")
    got = _load(run_dir / "last.pth")
    assert (got["epoch"], got["step"]) == (ref["epoch"], ref["step"]) == (1, 10)
    diff = _max_diff(got["model"], ref["model"])
    assert diff <= 1e-6, f"restarted group's weights differ from the uninterrupted group's by {diff:.3g}"


# --------------------------------------------------------------------------- in-process units


def test_stop_request_records_sigterm_instead_of_dying_and_restores_the_previous_handler() -> None:
    from preemption import StopRequest

    previous = signal.getsignal(signal.SIGTERM)
    stop = StopRequest().install()
    try:
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        assert stop.agreed(torch.device("cpu"))  # one process: its own flag decides
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize("stop_after, saves", [(2, [2]), (3, [2, 3])], ids=["at-a-periodic-save", "between-saves"])
def test_stop_request_ends_the_epoch_at_the_step_boundary_with_exactly_one_checkpoint_of_that_step(
    stop_after: int, saves: list[int]
) -> None:
    from config import get_config
    from distributed import DistEnv, make_grad_scaler
    from engine import StepHooks, StopTraining, TrainState, train_one_epoch
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer

    config = get_config(DEMO_CFG, TINY_OPTS + ["TRAIN.STEP_SAVE_FREQ", "2", "TRAIN.EPOCHS", "1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    loader = [(torch.randn(4, 3, 4, 4), torch.randint(0, 10, (4,))) for _ in range(5)]
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, len(loader), 1e-3, 1e-6, 1e-5)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    state = TrainState()
    written: list[int] = []
    hooks = StepHooks(
        save_step_checkpoint=lambda: written.append(state.step),
        stop_requested=lambda: state.step >= stop_after,
        step_save_freq=2,
    )
    with pytest.raises(StopTraining, match=f"stopped at epoch 0, batch {stop_after}/5"):
        train_one_epoch(
            config,
            model,
            torch.nn.CrossEntropyLoss(),
            loader,
            optimizer,
            scheduler,
            make_grad_scaler(env.device, False, None),
            None,
            env,
            state,
            hooks,
        )
    # The checkpoint describes the state after the last finished step; a resume continues there.
    assert written == saves
    assert (state.step, state.batch_in_epoch) == (stop_after, stop_after)


def test_one_process_polls_its_own_flag_with_no_collective_and_no_device_read(monkeypatch) -> None:
    import preemption

    def no_collective(t):
        raise AssertionError("a single process must not all-reduce (nor read a device tensor back)")

    monkeypatch.setattr(preemption, "all_reduce_sum", no_collective)
    stop = preemption.StopRequest(poll_every=10)
    assert not any(stop.agreed(torch.device("cpu"), step) for step in range(1, 25))
    stop.signal_name = "SIGTERM"
    assert stop.agreed(torch.device("cpu"), 7)  # at once, not at the next multiple of 10


def test_several_ranks_poll_at_every_nth_step_only_and_stop_together_there(monkeypatch) -> None:
    import preemption

    polls = []

    def all_reduce_with_a_signalled_peer(t):
        polls.append(t.clone())
        return t + 1.0  # another rank received SIGTERM

    monkeypatch.setattr(preemption, "is_multi_process", lambda: True)
    monkeypatch.setattr(preemption, "all_reduce_sum", all_reduce_with_a_signalled_peer)
    stop = preemption.StopRequest(poll_every=4)
    answers = [stop.agreed(torch.device("cpu"), step) for step in range(1, 9)]
    assert answers == [False, False, False, True, False, False, False, True]
    assert len(polls) == 2 and all(float(p) == 0.0 for p in polls)  # this rank's own flag: unset
