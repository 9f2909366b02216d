"""main.py as a user runs it: train, --eval, --throughput, and one-line errors for user mistakes.

The happy path and a few errors run ``main.py`` in a subprocess (real exit codes and streams);
the rest of the error matrix calls ``main.main(argv)`` in-process, which is what
``python main.py`` runs, to stay fast. A tiny Swin (embed 16, 32x32) on 80 digits keeps it quick.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CFG, MAIN, TINY_RUN_OPTS, demo_args, subprocess_env

import main as main_module

ROOT = Path(__file__).resolve().parents[1]
TINY_OPTS = TINY_RUN_OPTS
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)")


def _subprocess(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, MAIN, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def _in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main_module.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _checkpoint_of(tmp_path: Path, name: str, opts: list[str]) -> Path:
    """A weights checkpoint of the tiny model changed by ``opts`` (another architecture)."""
    from checkpoint import save_checkpoint
    from config import get_config
    from models import build_model

    model = build_model(get_config(DEMO_CFG, TINY_OPTS + ["MODEL.NUM_CLASSES", "10", *opts]))
    path = tmp_path / name
    save_checkpoint(str(path), {"model": model.state_dict(), "epoch": 0})
    return path


# --------------------------------------------------------------------------- happy path


@pytest.mark.slow
def test_train_then_eval_resume_reports_the_same_accuracy_and_throughput_reports_images_per_s(
    small_data: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    kept_memory_calls: list[bool],
) -> None:
    train = _subprocess(demo_args(small_data, tmp_path, "--tag", "cli"))
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    run_dir = tmp_path / "swin_demo_digits" / "cli"
    assert "Train: [0/1][4/5]" in train.stdout and (run_dir / "last.pth").is_file()
    assert train.stderr == ""  # no warnings or stray output from any stage of a real run
    trained = ACC_LINE.findall(train.stdout)[-1]

    evaluated = _subprocess(
        demo_args(small_data, tmp_path, "--tag", "cli-eval", "--eval", "--resume", str(run_dir / "last.pth"))
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert "Train:" not in evaluated.stdout and evaluated.stderr == ""  # --eval only evaluates
    found = ACC_LINE.findall(evaluated.stdout)
    assert len(found) == 1
    acc1, acc5, loss, count = found[0]
    assert int(count) == 15 and 0.0 <= float(acc1) <= float(acc5) <= 100.0 and float(loss) > 0
    assert found[0] == trained  # the same weights give the same numbers
    assert f"Accuracy of the network on the 15 test images: {float(acc1):.2f}%" in evaluated.stdout

    assert "inference: freed memory kept in this process" in evaluated.stdout  # RETAIN_FREED_MEMORY

    code, out, err = _in_process(demo_args(small_data, tmp_path, "--tag", "cli-tp", "--throughput"), capsys)
    assert code == 0, err
    assert kept_memory_calls == [True]  # large blocks too (recorded here: conftest)
    assert re.search(
        r"throughput: [\d.]+ images/s \(batch 16, 32x32, float32, device cpu, "
        r"10 timed iterations after [4-8] untimed\)",  # 3 warm-up, 1-5 until the page faults stop
        out,
    ), out
    assert "Train:" not in out and "Acc@1" not in out

    # bf16: --eval and --throughput keep the model under autocast, its linears packed as bf16 copies.
    bf16 = ["AMP_ENABLE", "True", "AMP_DTYPE", "bfloat16"]
    args = demo_args(small_data, tmp_path, "--tag", "cli-bf16", "--eval", "--resume", str(run_dir / "last.pth"))
    code, out, err = _in_process(args + bf16, capsys)
    assert code == 0 and ACC_LINE.search(out).group(4) == "15", err
    assert "prepacked for oneDNN (as bf16 copies: autocast's products)" in out
    code, out, err = _in_process(demo_args(small_data, tmp_path, "--tag", "cli-bf16-tp", "--throughput") + bf16, capsys)
    assert code == 0, err
    assert re.search(r"throughput: [\d.]+ images/s \(batch 16, 32x32, bfloat16 autocast, float32 weights", out), out


# --------------------------------------------------------------------------- user errors


def test_unknown_opts_key_exits_2_with_one_error_line_naming_the_closest_key() -> None:
    proc = _subprocess(["--cfg", DEMO_CFG, "--opts", "TRAIN.EPOCH", "3"])
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr) == "error: unknown config key TRAIN.EPOCH in --opts; did you mean TRAIN.EPOCHS?"


def test_debug_shows_the_traceback_of_a_user_error() -> None:
    proc = _subprocess(["--cfg", DEMO_CFG, "--debug", "--opts", "TRAIN.EPOCH", "3"])
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "errors.UserError: unknown config key TRAIN.EPOCH in --opts; did you mean TRAIN.EPOCHS?" in proc.stderr


def test_report_user_errors_prints_one_line_and_returns_2_lets_bugs_and_debug_through(capsys) -> None:
    from errors import UserError, report_user_errors

    def refuse() -> None:
        raise UserError("batch size 0; use a positive --batch-size")

    assert report_user_errors(lambda: None) == 0
    assert report_user_errors(refuse) == 2
    assert capsys.readouterr().err == "error: batch size 0; use a positive --batch-size\n"
    with pytest.raises(UserError):
        report_user_errors(refuse, debug=True)
    with pytest.raises(ZeroDivisionError):
        report_user_errors(lambda: 1 / 0)


def _class_mismatch(data: str, tmp: Path) -> str:
    copy = tmp / "mismatched"
    shutil.copytree(data, copy)
    os.makedirs(copy / "val" / "extra")
    return str(copy)


def _bad_yaml(tmp: Path) -> Path:
    path = tmp / "bad.yaml"
    path.write_text("TRAIN:\n  EPOCH: 3\n")
    return path


# case -> (data path, tmp) -> (argv, text the error line must contain)
USER_ERRORS = {
    "missing-data-path": lambda data, tmp: (
        demo_args(str(tmp / "nope"), tmp),
        f"--data-path {tmp / 'nope'} does not exist",
    ),
    "train-val-class-mismatch": lambda data, tmp: (
        demo_args(_class_mismatch(data, tmp), tmp),
        "have different class folders (only in val/: extra)",
    ),
    "unknown-yaml-key": lambda data, tmp: (
        ["--cfg", str(_bad_yaml(tmp))],
        f"unknown config key TRAIN.EPOCH in {tmp / 'bad.yaml'}; did you mean TRAIN.EPOCHS?",
    ),
    "wrong-value-type": lambda data, tmp: (
        demo_args(data, tmp, opts=("TRAIN.EPOCHS", "abc")),
        "wrong value type for TRAIN.EPOCHS in --opts",
    ),
    "image-smaller-than-a-patch": lambda data, tmp: (
        demo_args(data, tmp, opts=("DATA.IMG_SIZE", "2", "MODEL.SWIN.PATCH_SIZE", "4")),
        "DATA.IMG_SIZE 2 is smaller than one 4x4 patch",
    ),
    "batch-size-0": lambda data, tmp: (
        demo_args(data, tmp, "--batch-size", "0"),
        "DATA.BATCH_SIZE is 0; use a positive --batch-size",
    ),
    "batch-larger-than-train-set": lambda data, tmp: (
        demo_args(data, tmp, "--batch-size", "81"),
        "DATA.BATCH_SIZE 81 is larger than the 80 training images per process",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_gives_one_error_line_and_exit_code_2(
    case: str, small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args, expected = USER_ERRORS[case](small_data, tmp_path)
    code, _out, err = _in_process(args, capsys)
    assert code == 2, err
    assert expected in _one_error_line(err)


def test_output_folder_that_cannot_be_written_is_a_user_error(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A folder below a regular file cannot be created, not even by root.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _out, err = _in_process(demo_args(small_data, blocker / "sub"), capsys)
    assert code == 2
    assert f"cannot write to output folder {blocker / 'sub'}" in _one_error_line(err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_output_folder_is_a_user_error(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _out, err = _in_process(demo_args(small_data, locked), capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert "cannot write to output folder" in _one_error_line(err)


@pytest.mark.parametrize(
    "opts, expected",
    [
        # Wider: the shapes differ, each mismatch is listed with both shapes.
        (
            ["MODEL.SWIN.EMBED_DIM", "24"],
            r"does not fit this architecture \(\d+ mismatched\): patch_embed\.proj\.weight: checkpoint \(24, 3, 2, 2\) "
            r"vs model \(16, 3, 2, 2\); ",
        ),
        # Every weight of the model is in the checkpoint with the right shape, but it has more blocks.
        (["MODEL.SWIN.DEPTHS", "[2,2,4,2]"], r"has 26 weights this model lacks \(e\.g\. \['layers\.2\.blocks\.2\."),
        # Same blocks, another window: the bias tables would have been silently resized.
        (
            ["MODEL.SWIN.WINDOW_SIZE", "2"],
            r"tensors of another window or image size \(e\.g\. \['layers\.0\.blocks\.0\.attn",
        ),
    ],
    ids=["wider", "deeper", "other-window"],
)
def test_resume_from_a_checkpoint_of_another_architecture_is_refused_listing_the_mismatches(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture, opts: list[str], expected: str
) -> None:
    other = _checkpoint_of(tmp_path, "other.pth", opts)
    code, _out, err = _in_process(demo_args(small_data, tmp_path, "--eval", "--resume", str(other)), capsys)
    assert code == 2
    line = _one_error_line(err)
    assert re.search(expected, line), line
    assert "check --cfg" in line


def test_resume_from_a_shallower_architecture_is_refused_naming_the_missing_weights(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shallow = _checkpoint_of(tmp_path, "shallow.pth", ["MODEL.SWIN.DEPTHS", "[2,2,1,2]"])
    code, _out, err = _in_process(demo_args(small_data, tmp_path, "--eval", "--resume", str(shallow)), capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "lacks" in line and "layers.2.blocks.1." in line


class _Payload:
    """Pickles to a call of ``open(marker, 'w')``: unpickling it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_passed_to_resume_is_refused_without_running_it(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload(str(marker)), "epoch": 0}, evil)

    code, _out, err = _in_process(demo_args(small_data, tmp_path, "--resume", str(evil)), capsys)
    assert code == 2
    assert f"refusing to load {evil}: it holds pickled Python objects" in _one_error_line(err)
    assert not marker.exists()
    # The payload is live: a plain (unsafe) unpickling does run it.
    loaded = torch.load(evil, weights_only=False)
    loaded["model"].close()
    assert marker.exists()


@pytest.mark.slow
def test_best_checkpoint_holds_the_best_epoch_even_between_save_freq_boundaries(
    small_data: str, tmp_path: Path
) -> None:
    import torch

    run = _subprocess(
        demo_args(
            small_data, tmp_path, "--tag", "best", opts=("TRAIN.EPOCHS", "4", "SAVE_FREQ", "100", "SAVE_KEEP", "0")
        )
    )
    assert run.returncode == 0, run.stderr[-2000:]
    accs = [float(m.group(1)) for m in ACC_LINE.finditer(run.stdout + run.stderr)]
    assert len(accs) == 4
    best_epoch = accs.index(max(accs))
    best = torch.load(tmp_path / "swin_demo_digits" / "best" / "best.pth", weights_only=True, map_location="cpu")
    assert best["epoch"] == best_epoch and best["max_accuracy"] == pytest.approx(max(accs), abs=1e-3)
    # Every epoch that set a new best was saved, though SAVE_FREQ 100 saves only epoch 0 and the last.
    new_bests = [e for e, a in enumerate(accs) if a > max(accs[:e], default=-1.0)]
    saved = sorted(
        int(p.stem.split("_")[-1]) for p in (tmp_path / "swin_demo_digits" / "best").glob("ckpt_epoch_*.pth")
    )
    assert set(new_bests) | {0, 3} == set(saved), (accs, saved)


# --------------------------------------------------------------------------- compile scopes


@pytest.fixture(scope="module")
def eager_tiny_run(small_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of the tiny demo run, eager: what every compiled run must end at."""
    out = tmp_path_factory.mktemp("eager_run")
    code = main_module.main(demo_args(small_data, out, "--tag", "eager", opts=("AMP_ENABLE", "False")))
    run = out / "swin_demo_digits" / "eager"
    log = run / "log_rank0.txt"
    assert code == 0, log.read_text()[-3000:] if log.exists() else f"main.py exited {code}"
    return run / "last.pth"


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_scope_trains_through_main_and_ends_with_the_eager_weights(
    small_data: str, eager_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, scope: str
) -> None:
    """TRAIN.COMPILE_SCOPE 'model' once raised UnboundLocalError before its first step; both
    scopes must train (aot_eager: Dynamo and AOTAutograd without Inductor's code generation) and
    end where the eager run ends."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled_opts = ("AMP_ENABLE", "False", "TRAIN.COMPILE", "True", "TRAIN.COMPILE_SCOPE", scope)
    compiled_opts += ("TRAIN.COMPILE_BACKEND", "aot_eager")
    code, out, err = _in_process(demo_args(small_data, tmp_path, "--tag", "compiled", opts=compiled_opts), capsys)
    assert code == 0, err[-3000:]
    assert "Train: [0/1][4/5]" in out + err
    torch._dynamo.reset()
    eager = torch.load(eager_tiny_run, weights_only=True)["model"]
    compiled = torch.load(tmp_path / "swin_demo_digits" / "compiled" / "last.pth", weights_only=True)["model"]
    assert compiled.keys() == eager.keys()  # no '_orig_mod.' prefixes in the checkpoint
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, atol=1e-5, rtol=1e-5, msg=k)


# --------------------------------------------------------------------------- a new user's first hour


def test_help_names_the_program_groups_the_options_and_shows_defaults_and_examples(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main_module.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: main.py ")
    for group in ("what to run:", "data:", "weights and checkpoints:", "training:", "examples:"):
        assert group in text
    assert "[DATA.BATCH_SIZE, default 128]" in text and "[DEVICE, default auto]" in text
    assert text.count("python main.py --cfg") + text.count("main.py --cfg") >= 3
    # The release's spellings and their aliases both parse.
    args = main_module.parse_args(["--disable-amp", "--batch_size", "4", "--fused-window-process", "--data_path", "d"])
    assert args.disable_amp and args.batch_size == 4 and args.fused_window_process and args.data_path == "d"


@pytest.mark.slow
def test_a_finished_run_says_so_modes_keep_their_own_config_and_the_log_states_precision(
    small_data: str, tmp_path: Path, capsys: pytest.CaptureFixture, kept_memory_calls: list[bool]
) -> None:
    code, out, err = _in_process(demo_args(small_data, tmp_path, "--tag", "done"), capsys)
    assert code == 0, err[-3000:]
    log = out + err
    assert "device cpu, world size 1, precision float32 (AMP_ENABLE False)" in log
    # A CPU training process keeps its freed memory, large blocks too (recorded here: conftest).
    assert "training: freed memory kept in this process" in log and kept_memory_calls == [True]
    assert "start training: epochs 0..0 of 1, 5 optimizer steps per epoch, 5 to go" in log
    assert re.search(r"Train: \[0/1\]\[4/5\]\teta 0:00:00 \(run 0:00:00\) lr", log)

    # Run again: nothing to train, and it says how to continue.
    code, out, err = _in_process(demo_args(small_data, tmp_path, "--tag", "done"), capsys)
    assert code == 0, err[-3000:]
    log = out + err
    assert "this run is complete (1 of 1 epochs" in log and "--opts TRAIN.EPOCHS N (N > 1)" in log
    assert "Train:" not in log

    run_dir = tmp_path / "swin_demo_digits" / "done"
    code, out, err = _in_process(
        demo_args(small_data, tmp_path, "--tag", "done", "--eval", "--resume", str(run_dir / "last.pth")), capsys
    )
    assert code == 0, err[-3000:]
    import yaml

    training = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert training["EVAL_MODE"] is False and training["THROUGHPUT_MODE"] is False
    assert yaml.safe_load((run_dir / "config_eval.yaml").read_text())["EVAL_MODE"] is True


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint", b"PK\x03\x04" + bytes(100)])
def test_unreadable_checkpoints_are_one_line_in_user_terms(
    small_data: str, tmp_path: Path, capsys, content: bytes
) -> None:
    path = tmp_path / "mine.pth"
    path.write_bytes(content)
    code, out, err = _in_process(demo_args(small_data, tmp_path, "--eval", "--resume", str(path)), capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"error: cannot read checkpoint {path}: the file ")
    assert ("is empty" in line) == (content == b"")
    for internal in ("Errno", "pop from", "EOFError", "KeyError", "delete it"):
        assert internal not in line


def test_resuming_a_step_checkpoint_with_half_the_global_batch_continues_at_the_same_image(caplog):
    """main.load_resume places a mid-epoch position saved at 32 images per step in this run's
    batches of 16 (a run resumed on half the ranks): batch 3 of 32 is batch 6 of 16."""
    import logging

    from config import get_config
    from distributed import DistEnv
    from engine import TrainState
    from lr_scheduler import build_scheduler
    from models import build_model
    from optimizer import build_optimizer

    config = get_config(DEMO_CFG, TINY_OPTS + ["MODEL.NUM_CLASSES", "10"])
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 10, 1e-3, 1e-6, 1e-5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 0,
        "step": 3,
        "nonfinite_total": 1,
        "sampler": {"epoch": 0, "batch_in_epoch": 3, "global_batch": 32},
    }
    state = TrainState()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    with caplog.at_level(logging.WARNING, logger="swin.checkpoint"):
        main_module.load_resume(
            "step.pth", model, optimizer, scheduler, scaler, state, env, logging.getLogger("test"),
            model_only=False, checkpoint=checkpoint, global_batch=16,
        )  # fmt: skip
    assert (state.epoch, state.batch_in_epoch, state.step, state.nonfinite_total) == (0, 6, 3, 1)
    assert "the checkpoint was trained with 32 images per optimizer step, this run takes 16" in caplog.text


def test_eval_with_throughput_under_fsdp_in_one_process_evaluates(small_data, tmp_path):
    """--eval wins over --throughput (as in the release), and under --fsdp a single process still
    starts its 1-rank group for it: the evaluation runs instead of failing for want of a group."""
    ckpt = _checkpoint_of(tmp_path, "weights.pth", [])
    done = _subprocess(demo_args(small_data, tmp_path, "--eval", "--throughput", "--fsdp", "--resume", str(ckpt)))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"Accuracy of the network on the 15 test images: [\d.]+%", done.stdout + done.stderr)
