"""Multi-process (gloo, CPU) behaviour: DDP training matches one big-batch process, eval is exact.

Both tests start real process groups in subprocesses (2 ranks on 2 CPU cores) with a tiny Swin
(embed 16, 32x32 inputs) so they stay fast; each process uses one intra-op thread.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
DEMO_BASE_LR = float(__import__("yaml").safe_load(open(DEMO_CFG))["TRAIN"]["BASE_LR"])

# Tiny, deterministic variant of the demo model (augmentation is off in the demo config already).
from conftest import TINY_RUN_OPTS, subprocess_env

TINY_OPTS = TINY_RUN_OPTS
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)")


# --------------------------------------------------------------------------- DDP == big batch

# The worker trains with the project's own pieces (config, build_model, build_optimizer,
# scaled_lrs, build_scheduler, build_criterion, train_one_epoch with its clip/step logic) on
# fixed batches. Rank r of W takes rows r*b:(r+1)*b of every global batch of W*b rows.
WORKER = textwrap.dedent(
    '''
    import os, socket, sys
    sys.path.insert(0, {root!r})
    import torch
    import torch.multiprocessing as mp

    DEMO_CFG, TINY_OPTS, OUT = {cfg!r}, {opts!r}, {out!r}
    STEPS, GLOBAL_BATCH = {steps}, {global_batch}


    def fixed_batches(accum):
        g = torch.Generator().manual_seed(1234)
        n = STEPS * accum
        return [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
                for _ in range(n)]


    def train(world_size, rank, per_rank_batch, accum, rows=None, lr_world_size=None):
        """Final weights of a run; ``rows`` (start, stop) overrides the slice of each global batch and
        ``lr_world_size`` the process count the learning rate is scaled for."""
        from config import get_config
        from distributed import cleanup, init_distributed, make_grad_scaler
        from engine import StepHooks, TrainState, train_one_epoch
        from lr_scheduler import build_scheduler
        from main import build_criterion
        from models import build_model
        from optimizer import build_optimizer, scaled_lrs

        opts = TINY_OPTS + ["DATA.BATCH_SIZE", str(per_rank_batch), "TRAIN.ACCUMULATION_STEPS", str(accum),
                            "MODEL.NUM_CLASSES", "10"]
        config = get_config(DEMO_CFG, opts)
        env = init_distributed("cpu")
        assert env.world_size == world_size and env.rank == rank, (env, world_size, rank)
        torch.manual_seed(0)
        model = build_model(config)
        if env.distributed:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(config, model)
        base_lr, warmup_lr, min_lr = scaled_lrs(config, lr_world_size or env.world_size)
        lr_scheduler = build_scheduler(config, optimizer, STEPS, base_lr, warmup_lr, min_lr)
        scaler = make_grad_scaler(env.device, False, None)
        start, stop = rows if rows else (rank * per_rank_batch, (rank + 1) * per_rank_batch)
        loader = [(x[start:stop], y[start:stop]) for x, y in fixed_batches(accum)]
        state = TrainState()
        hooks = StepHooks(save_step_checkpoint=lambda: None, stop_requested=lambda: False)
        train_one_epoch(config, model, build_criterion(config, False), loader, optimizer, lr_scheduler, scaler,
                        None, env, state, hooks)
        assert state.step == STEPS, state.step
        weights = getattr(model, "module", model).state_dict()
        cleanup()
        return {{"weights": weights, "lr": optimizer.param_groups[0]["lr"], "base_lr": base_lr}}


    def rank_main(rank, port, per_rank_batch, accum):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.save(train(2, rank, per_rank_batch, accum), os.path.join(OUT, f"ddp_accum{{accum}}_rank{{rank}}.pt"))


    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


    if __name__ == "__main__":
        for accum in {accums!r}:
            # Fork before this process computes anything; the 2 ranks then run side by side.
            mp.start_processes(rank_main, args=(free_port(), GLOBAL_BATCH // 2, accum), nprocs=2,
                               start_method="fork")
            torch.save(train(1, 0, GLOBAL_BATCH, accum), os.path.join(OUT, f"single_accum{{accum}}.pt"))
        # Negative control: rank 0 of 2 without gradient averaging (its half of every batch, same lr).
        torch.save(train(1, 0, GLOBAL_BATCH // 2, 1, rows=(0, GLOBAL_BATCH // 2), lr_world_size=2),
                   os.path.join(OUT, "half.pt"))
    '''
)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# The same tiny model as Swin V2 (its demo config, the MODEL.SWINV2 section).
V2_DEMO_CFG = str(ROOT / "configs" / "demo" / "swinv2_demo_digits.yaml")
TINY_OPTS_V2 = [o.replace("MODEL.SWIN.", "MODEL.SWINV2.") for o in TINY_OPTS]
FAMILIES = {"v1": (DEMO_CFG, TINY_OPTS), "v2": (V2_DEMO_CFG, TINY_OPTS_V2)}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_gloo_ranks_with_batch_b_train_the_same_weights_as_one_process_with_batch_2b(
    tmp_path: Path, family: str
) -> None:
    steps, global_batch, accums = 4, 8, (1, 2)
    cfg, opts = FAMILIES[family]
    script = tmp_path / "ddp_worker.py"
    script.write_text(
        WORKER.format(
            root=str(ROOT),
            cfg=cfg,
            opts=opts,
            out=str(tmp_path),
            steps=steps,
            global_batch=global_batch,
            accums=accums,
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    half = torch.load(tmp_path / "half.pt", weights_only=True)
    for accum in accums:
        single = torch.load(tmp_path / f"single_accum{accum}.pt", weights_only=True)
        ranks = [torch.load(tmp_path / f"ddp_accum{accum}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        # Per-rank batch b on 2 ranks is the same total batch as 2b on one: the same scaled lr.
        assert ranks[0]["base_lr"] == single["base_lr"] == pytest.approx(DEMO_BASE_LR * global_batch * accum / 512)
        assert ranks[0]["lr"] == ranks[1]["lr"] == single["lr"]
        # DDP keeps the replicas identical, and they match the single big-batch process.
        assert _max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
        diff = _max_diff(ranks[0]["weights"], single["weights"])
        assert diff < 1e-5, f"accumulation {accum}: DDP and single-process weights differ by {diff:.3g}"

    # The comparison can fail: training on half of each batch (what a rank would do without
    # gradient averaging) ends well outside the tolerance. (In float64 the DDP and single runs
    # agree to ~1e-14; the float32 gap, ~4e-7 here, is rounding that AdamW amplifies.)
    single = torch.load(tmp_path / "single_accum1.pt", weights_only=True)
    assert half["base_lr"] == single["base_lr"]
    assert _max_diff(half["weights"], single["weights"]) > 5e-5


# --------------------------------------------------------------------------- exact evaluation


def _small_imagefolder(src: str, dst: Path, train_per_class: int, val_total: int) -> Path:
    """A copy of ``src`` with ``train_per_class`` train images per class and ``val_total`` val images."""
    classes = sorted(os.listdir(os.path.join(src, "train")))
    for c in classes:
        (dst / "train" / c).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(src, "train", c)))[:train_per_class]:
            shutil.copy(os.path.join(src, "train", c, name), dst / "train" / c / name)
        (dst / "val" / c).mkdir(parents=True)
    # Round-robin over classes so the val set is odd-sized and every class appears.
    per_class = {c: sorted(os.listdir(os.path.join(src, "val", c))) for c in classes}
    for i in range(val_total):
        c = classes[i % len(classes)]
        name = per_class[c][i // len(classes)]
        shutil.copy(os.path.join(src, "val", c, name), dst / "val" / c / name)
    return dst


def _parse_eval(output: str) -> tuple[float, float, float, int]:
    found = ACC_LINE.findall(output)
    assert len(found) == 1, output[-3000:]
    acc1, acc5, loss, count = found[0]
    return float(acc1), float(acc5), float(loss), int(count)


@pytest.mark.slow
def test_eval_on_two_gloo_ranks_reports_what_one_process_reports_for_an_odd_val_set(
    demo_data: str, tmp_path: Path
) -> None:
    val_total = 15  # odd: 8 images on rank 0, 7 on rank 1, last batches partial
    data = _small_imagefolder(demo_data, tmp_path / "data", train_per_class=2, val_total=val_total)

    # A checkpoint with (random, fixed) weights of the tiny model, as training would write it.
    from checkpoint import save_checkpoint
    from config import get_config
    from models import build_model

    torch.manual_seed(3)
    model = build_model(get_config(DEMO_CFG, TINY_OPTS + ["MODEL.NUM_CLASSES", "10"]))
    ckpt = tmp_path / "weights.pth"
    save_checkpoint(str(ckpt), {"model": model.state_dict(), "epoch": 0})

    common = [
        str(ROOT / "main.py"),
        "--cfg",
        DEMO_CFG,
        "--data-path",
        str(data),
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--eval",
        "--resume",
        str(ckpt),
        "--opts",
        *TINY_OPTS,
    ]
    # The one-process reference runs alongside the torchrun launch (both mostly start up).
    single = subprocess.Popen(
        [sys.executable, *common, "--output", str(tmp_path / "one")],
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        multi = subprocess.run(
            [*launcher, *common, "--output", str(tmp_path / "two")],
            env=subprocess_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        single_out, single_err = single.communicate(timeout=300)
    assert single.returncode == 0, single_out[-3000:] + single_err[-3000:]
    # On failure show each rank's own error line first: torchrun's traceback hides it.
    assert multi.returncode == 0, "\n".join(re.findall(r".*error: .*", multi.stderr)) + multi.stderr[-3000:]

    acc1, acc5, loss, count = _parse_eval(single_out)
    acc1_2, acc5_2, loss_2, count_2 = _parse_eval(multi.stdout)
    assert count == count_2 == val_total  # every image exactly once: no padding, no duplicates
    assert (acc1_2, acc5_2) == (acc1, acc5)
    assert loss_2 == pytest.approx(loss, abs=1e-4)  # printed with 4 decimals
    # Both ranks really took part: each wrote its own log with its share of the val set.
    run_dir = tmp_path / "two" / "swin_demo_digits" / "default"
    assert "world size 2" in (run_dir / "log_rank0.txt").read_text()
    assert "7 val images on this rank" in (run_dir / "log_rank1.txt").read_text()


@pytest.mark.slow
def test_two_gloo_ranks_exclude_and_name_unreadable_val_images_as_one_process_does(
    demo_data: str, tmp_path: Path
) -> None:
    val_total = 15
    data = _small_imagefolder(demo_data, tmp_path / "data", train_per_class=2, val_total=val_total)
    # Random bytes under .png names, one in the share of each rank (ExactEvalSampler: index % 2).
    bad = [data / "val" / "3" / "bad.png", data / "val" / "8" / "bad.png"]
    for i, path in enumerate(bad):
        path.write_bytes(os.urandom(1500 + i))

    from checkpoint import save_checkpoint
    from config import get_config
    from data import build_dataset, build_loader
    from distributed import DistEnv
    from engine import eval_summary, evaluate
    from models import build_model

    opts = TINY_OPTS + ["MODEL.NUM_CLASSES", "10", "DATA.BATCH_SIZE", "4", "DATA.DATA_PATH", str(data)]
    config = get_config(DEMO_CFG, opts)
    paths = [p for p, _ in build_dataset(False, config)[0].samples]
    assert sorted(paths.index(str(p)) % 2 for p in bad) == [0, 1]

    torch.manual_seed(3)
    model = build_model(config)
    ckpt = tmp_path / "weights.pth"
    save_checkpoint(str(ckpt), {"model": model.state_dict(), "epoch": 0})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    multi = subprocess.Popen(
        [
            *launcher,
            str(ROOT / "main.py"),
            "--cfg",
            DEMO_CFG,
            "--data-path",
            str(data),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--eval",
            "--resume",
            str(ckpt),
            "--output",
            str(tmp_path / "two"),
            "--opts",
            *TINY_OPTS,
        ],
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The one-process reference, evaluated here while the ranks start up.
        cpu = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
        single = evaluate(config, build_loader(config, 1, 0).loader_val, model, cpu)
    finally:
        multi_out, multi_err = multi.communicate(timeout=300)
    assert multi.returncode == 0, "\n".join(re.findall(r".*error: .*", multi_err)) + multi_err[-3000:]

    assert single["count"] == val_total and single["total"] == val_total + 2
    assert single["unreadable"] == sorted(str(p) for p in bad)
    expected = eval_summary(single, str(data))
    assert expected.endswith(
        f"images 15 of 17, 2 unreadable: {os.path.join('val', '3', 'bad.png')}, {os.path.join('val', '8', 'bad.png')}"
    )
    # Each rank read one bad file, yet both report both files and the totals of the whole set.
    run_dir = tmp_path / "two" / "swin_demo_digits" / "default"
    for rank in (0, 1):
        lines = [line for line in (run_dir / f"log_rank{rank}.txt").read_text().splitlines() if ACC_LINE.search(line)]
        assert len(lines) == 1, lines
        acc1, acc5, loss, count = ACC_LINE.search(lines[0]).groups()
        assert (acc1, acc5, int(count)) == (f"{single['acc1']:.3f}", f"{single['acc5']:.3f}", val_total)
        assert float(loss) == pytest.approx(single["loss"], abs=1e-4)  # printed with 4 decimals
        assert lines[0].endswith(expected[expected.index(" of ") :])
    assert ACC_LINE.search(multi_out), multi_out[-3000:]  # rank 0 also shows it on the console


# --------------------------------------------------------------------------- shared output folder


def _probe_output_repeatedly(path: str) -> str:
    import main

    for _ in range(1000):
        try:
            main._prepare_output(path)
        except Exception as e:  # noqa: BLE001 - report what a rank would have died of
            return f"{type(e).__name__}: {e}"
    return "ok"


def test_ranks_checking_the_same_output_folder_do_not_fail_each_other(tmp_path: Path) -> None:
    # Every rank checks that OUTPUT is writable at start-up; with one shared probe file name a
    # rank could delete the file another rank was about to delete, and die with a false
    # "cannot write to output folder" (seen as a flaky torchrun exit code 2).
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_probe_output_repeatedly, [str(tmp_path / "out")] * 2)
    assert results == ["ok", "ok"]
    assert os.listdir(tmp_path / "out") == []  # no probe files left behind


# --------------------------------------------------------------------------- restarts under torchrun


def test_a_restarted_attempt_keeps_its_keys_apart_from_the_killed_attempts_in_the_agents_store(monkeypatch) -> None:
    # torchrun's agent hosts one store for all attempts; a key the killed attempt left behind
    # (a Gloo address, an NCCL id) must not be what the next attempt reads.
    from datetime import timedelta

    import torch.distributed as dist

    from distributed import _restart_scoped_store

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    scoped = {}
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        scoped[attempt] = _restart_scoped_store(0, 1)
        scoped[attempt].set("rank0_address", f"address of attempt {attempt}")
    assert scoped["1"].get("rank0_address") == b"address of attempt 1"
    assert scoped["0"].get("rank0_address") == b"address of attempt 0"
    assert not agent.check(["rank0_address"])  # nothing written unscoped
    # Outside torchrun's shared store, rank 0 hosts a fresh store per attempt: nothing to scope.
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    assert _restart_scoped_store(0, 1) is None


# --------------------------------------------------------------------------- CUDA paths, on the CPU


def test_cpu_run_saves_no_cuda_rng_state_and_never_touches_cuda(monkeypatch):
    import checkpoint as ck

    def boom(*args, **kwargs):
        raise AssertionError("CUDA touched by a CPU run")

    monkeypatch.setattr(torch.cuda, "get_rng_state", boom)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", boom)
    assert ck.capture_rng_state(torch.device("cpu"))["cuda"] == []


def test_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    import distributed

    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((4,), device.index, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: seen.append((int(state[0]), device.index)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    saved = distributed.get_cuda_rng_states(torch.device("cuda", 2))
    assert len(saved) == 1 and int(saved[0][0]) == 2
    assert distributed.set_cuda_rng_states(saved, torch.device("cuda", 3)) and seen[-1] == (2, 3)
    # An older checkpoint with every GPU's state: this device's entry.
    old = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]
    assert distributed.set_cuda_rng_states(old, torch.device("cuda", 1)) and seen[-1] == (1, 1)
    assert not distributed.set_cuda_rng_states(old[:3], torch.device("cuda", 1))  # cannot be matched
    assert not distributed.set_cuda_rng_states(saved, torch.device("cpu"))


def test_tf32_is_enabled_on_cuda_only_and_configurable(monkeypatch):
    import distributed
    from errors import UserError

    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    distributed.configure_matmul_precision(torch.device("cpu"), "high")
    assert calls == []
    distributed.configure_matmul_precision(torch.device("cuda", 0), "high")
    distributed.configure_matmul_precision(torch.device("cuda", 0), "highest")
    assert calls == ["high", "highest"]
    with pytest.raises(UserError, match="CUDA_MATMUL_PRECISION must be one of highest, high, medium"):
        distributed.configure_matmul_precision(torch.device("cuda", 0), "tf32")


def test_ddp_does_not_rebroadcast_the_derived_buffers(tmp_path):
    """The position buffers are the same on every rank; a broadcast per forward would also make
    an eval forward a collective that hangs a rank with no validation batch."""
    import torch.distributed as dist

    import distributed
    from config import get_config
    from models import build_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(get_config(V2_DEMO_CFG, TINY_OPTS_V2))
        ddp = distributed.wrap_ddp(model, torch.device("cpu"))
        assert getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) is False and ddp.module is model
    finally:
        dist.destroy_process_group()


def test_auto_precision_is_bf16_on_gpus_that_support_it_and_fp16_with_the_scaler_on_older_ones(monkeypatch):
    import distributed

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert distributed.resolve_amp_dtype(cuda, "auto") == torch.bfloat16
    assert not distributed.make_grad_scaler(cuda, True, torch.bfloat16).is_enabled()
    assert "bfloat16 autocast, float32 weights (AMP_DTYPE auto: this GPU has native bfloat16)" in (
        distributed.describe_precision(cuda, True, "auto")
    )
    # A V100 or T4: torch says yes to bf16 unless emulation is excluded.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert distributed.resolve_amp_dtype(cuda, "auto") == torch.float16
    assert distributed.describe_precision(cuda, True, "auto") == (
        "float16 autocast with loss scaling, float32 weights (AMP_DTYPE auto: this GPU lacks native bfloat16)"
    )
    assert distributed.describe_precision(torch.device("cpu"), False, "auto") == "float32 (AMP_ENABLE False)"
