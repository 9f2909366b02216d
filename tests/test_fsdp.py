"""FSDP2 sharding and sharded (DCP) checkpoints on CPU with gloo, tiny Swin models.

* 2 ranks with ``fully_shard`` train the same weights as one process without it (V1 with
  clipping and accumulation, V2 with gradient checkpointing and layer decay), and evaluate the
  same with unevenly split batches;
* a checkpoint saved by 2 sharded ranks resumes in one process without a process group and ends
  where the uninterrupted run ends;
* ``main.py --fsdp`` under torchrun, killed with SIGKILL after a step checkpoint, resumes by
  itself in one process (another world size) and ends with the weights of an uninterrupted run;
* incomplete folders, another architecture and foreign pickles are refused in one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
V2_DEMO_CFG = str(ROOT / "configs" / "demo" / "swinv2_demo_digits.yaml")
MODEL_NAME = "swin_demo_digits"

from conftest import MAIN, TINY_RUN_OPTS, demo_args, subprocess_env

TINY_OPTS_V2 = [o.replace("MODEL.SWIN.", "MODEL.SWINV2.") for o in TINY_RUN_OPTS]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------- in-process ranks

# Trains with the project's own pieces on fixed batches (rank r of W takes rows r*b:(r+1)*b of
# every global batch). Cases: (name, config, opts, accumulation).
WORKER = textwrap.dedent(
    '''
    import os, socket, sys
    sys.path.insert(0, {root!r})
    import torch
    import torch.multiprocessing as mp

    OUT, STEPS, GLOBAL_BATCH, SAVE_AT = {out!r}, {steps}, {global_batch}, {save_at}
    CASES = {cases!r}


    def batches(accum):
        g = torch.Generator().manual_seed(1234)
        return [(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g))
                for _ in range(STEPS * accum)]


    def setup(case, sharded, env):
        from config import get_config
        from distributed import make_grad_scaler
        from fsdp import shard_model
        from lr_scheduler import build_scheduler
        from models import build_model
        from optimizer import build_optimizer, scaled_lrs

        name, cfg, opts, accum = case
        config = get_config(cfg, opts + ["DATA.BATCH_SIZE", str(GLOBAL_BATCH // env.world_size),
                                         "TRAIN.ACCUMULATION_STEPS", str(accum), "MODEL.NUM_CLASSES", "10"])
        torch.manual_seed(0)
        model = build_model(config)
        if sharded:
            shard_model(model, env)
        optimizer = build_optimizer(config, model)  # after sharding: it holds the shards
        base_lr, warmup_lr, min_lr = scaled_lrs(config, env.world_size)
        scheduler = build_scheduler(config, optimizer, STEPS, base_lr, warmup_lr, min_lr)
        return config, model, optimizer, scheduler, make_grad_scaler(env.device, False, None)


    def run_steps(config, model, optimizer, scheduler, scaler, env, state, accum, first, last):
        from engine import StepHooks, train_one_epoch
        from main import build_criterion

        b = GLOBAL_BATCH // env.world_size
        lo, hi = env.rank * b, (env.rank + 1) * b
        loader = [(x[lo:hi], y[lo:hi]) for x, y in batches(accum)[first * accum:last * accum]]
        hooks = StepHooks(save_step_checkpoint=lambda: None, stop_requested=lambda: False)
        return train_one_epoch(config, model, build_criterion(config, False), loader, optimizer, scheduler, scaler,
                               None, env, state, hooks)


    def full_weights(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


    def rank_main(rank, port):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from distributed import cleanup, init_distributed
        from engine import TrainState, evaluate
        from sharded_checkpoint import save_sharded

        env = init_distributed("cpu")
        trained = {{}}
        for case in CASES:
            config, model, optimizer, scheduler, scaler = setup(case, True, env)
            state = TrainState()
            stats = run_steps(config, model, optimizer, scheduler, scaler, env, state, case[3], 0, SAVE_AT)
            trainer = dict(epoch=0, step=state.step, lr_scheduler=scheduler.state_dict(), config=config.dump(),
                           sampler=dict(epoch=0, batch_in_epoch=state.batch_in_epoch, global_batch=GLOBAL_BATCH))
            save_sharded(OUT, case[0] + ".dcp", model, optimizer, trainer)
            stats2 = run_steps(config, model, optimizer, scheduler, scaler, env, state, case[3], SAVE_AT, STEPS)
            weights = trained[case[0]] = full_weights(model)
            # Uneven evaluation: rank 0 gets 2 batches, rank 1 one; FSDP must not hang.
            x, y = batches(1)[0]
            rows = [(0, 3), (3, 5)] if rank == 0 else [(5, 8)]
            val = [(x[i:j], y[i:j]) for i, j in rows]
            result = evaluate(config, val, model, env)
            if rank == 0:
                torch.save({{"weights": weights, "eval": result, "norm": [stats["grad_norm"], stats2["grad_norm"]],
                            "step": state.step}}, os.path.join(OUT, case[0] + "_fsdp.pt"))
        optimizer_by_name(env)
        bf16_gathering(env, trained)
        cleanup()


    def bf16_gathering(env, trained):
        """The GPU recipe's gathering in bf16, here under CPU autocast: logits as the unsharded
        model's under autocast (to bf16 rounding; V2 gathers in fp32), gradient shards in fp32.
        Trained weights: freshly initialised norms (ones, zeros) are exact in bf16 and would hide it."""
        import copy
        from config import get_config
        from distributed import autocast_context
        from fsdp import same_initial_weights, shard_model
        from models import build_model

        out = {{}}
        for name, cfg, opts, _ in CASES:
            with same_initial_weights(0):
                model = build_model(get_config(cfg, opts + ["MODEL.NUM_CLASSES", "10"]))
            model.load_state_dict(trained[name])
            reference = copy.deepcopy(model)
            shard_model(model, env, torch.bfloat16)
            x, y = batches(1)[0]
            with autocast_context(env.device, True, "bfloat16"):
                got, want = model(x[:2]), reference(x[:2])
            torch.nn.functional.cross_entropy(got.float(), y[:2]).backward()
            grads = {{p.grad.dtype for p in model.parameters() if p.grad is not None}}
            out[name] = ((got.float() - want.float()).abs().max().item(), sorted(str(g) for g in grads))
        if env.rank == 0:
            torch.save(out, os.path.join(OUT, "bf16.pt"))


    def optimizer_by_name(env):
        """A plain optimizer state (numbered parameters, whole tensors: a .pth of a DDP run) loads
        into a sharded optimizer: every rank keeps its shard of every moment."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        from fsdp import load_full_optimizer_state

        config, plain, plain_opt, _, _ = setup(CASES[1], False, env)
        x, y = batches(1)[0]
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        config, model, optimizer, _, _ = setup(CASES[1], True, env)
        load_full_optimizer_state(model, optimizer, plain_opt.state_dict())
        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        by_name = {{n: plain_opt.state[p] for n, p in plain.named_parameters()}}
        moments = [(full["state"][n][k], v[k]) for n, v in by_name.items() for k in ("exp_avg", "exp_avg_sq")]
        diff = max((a - b).abs().max().item() for a, b in moments)
        lrs = [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in plain_opt.param_groups]
        if env.rank == 0:
            torch.save({{"diff": diff, "moments": len(full["state"]), "lrs": lrs}}, os.path.join(OUT, "optimizer.pt"))


    def single(case):
        """One process, unsharded: the uninterrupted run, and a resume of the 2-rank checkpoint."""
        from distributed import DistEnv
        from engine import TrainState, evaluate
        from sharded_checkpoint import load_sharded

        env = DistEnv(0, 1, 0, torch.device("cpu"), False)
        config, model, optimizer, scheduler, scaler = setup(case, False, env)
        state = TrainState()
        run_steps(config, model, optimizer, scheduler, scaler, env, state, case[3], 0, STEPS)
        x, y = batches(1)[0]
        result = evaluate(config, [(x[:8], y[:8])], model, env)
        out = {{"weights": model.state_dict(), "eval": result}}

        config, model, optimizer, scheduler, scaler = setup(case, False, env)
        trainer = load_sharded(os.path.join(OUT, case[0] + ".dcp"), model, optimizer)
        scheduler.load_state_dict(trainer["lr_scheduler"])
        state = TrainState(step=trainer["step"])
        run_steps(config, model, optimizer, scheduler, scaler, env, state, case[3], SAVE_AT, STEPS)
        out["resumed"] = model.state_dict()
        torch.save(out, os.path.join(OUT, case[0] + "_single.pt"))


    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


    if __name__ == "__main__":
        # Fork before this process computes anything; the 2 ranks then run side by side.
        mp.start_processes(rank_main, args=(free_port(),), nprocs=2, start_method="fork")
        for case in CASES:
            single(case)
    '''
)

CLIP = 0.05  # well below the tiny model's gradient norm: clipping acts on every step
CASES = [
    ("v1", DEMO_CFG, [*TINY_RUN_OPTS, "TRAIN.CLIP_GRAD", str(CLIP)], 2),
    ("v2", V2_DEMO_CFG, [*TINY_OPTS_V2, "TRAIN.USE_CHECKPOINT", "True", "TRAIN.LAYER_DECAY", "0.8"], 1),
]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(out), steps=4, global_batch=8, save_at=2, cases=CASES))
    proc = subprocess.run(
        [sys.executable, str(script)], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["v1", "v2"])
def test_two_sharded_ranks_train_and_evaluate_as_one_unsharded_process(fsdp_runs: Path, case: str) -> None:
    sharded = torch.load(fsdp_runs / f"{case}_fsdp.pt", weights_only=True)
    single = torch.load(fsdp_runs / f"{case}_single.pt", weights_only=True)
    assert sharded["step"] == 4
    diff = _max_diff(sharded["weights"], single["weights"])
    assert diff < 1e-5, f"{case}: FSDP and single-process weights differ by {diff:.3g}"
    if case == "v1":
        # The norm is the global one (all shards), so clipping scaled as in one process.
        assert min(sharded["norm"]) > CLIP
    # 3 + 2 rows on rank 0 and 3 on rank 1 score as the 8 rows in one process.
    for key in ("acc1", "acc5", "count"):
        assert sharded["eval"][key] == single["eval"][key]
    assert sharded["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_weights_gathered_in_bf16_compute_what_autocast_computes_unsharded(fsdp_runs: Path) -> None:
    result = torch.load(fsdp_runs / "bf16.pt", weights_only=True)
    v1_diff, v1_grads = result["v1"]
    assert 0.0 < v1_diff < 0.25 and v1_grads == ["torch.float32"]  # bf16 rounding of the weights only
    v2_diff, v2_grads = result["v2"]
    assert v2_diff == 0.0 and v2_grads == ["torch.float32"]  # V2's position-bias MLP needs fp32: not cast


@pytest.mark.slow
def test_a_plain_optimizer_state_loads_into_the_sharded_optimizer_by_parameter_name(fsdp_runs: Path) -> None:
    result = torch.load(fsdp_runs / "optimizer.pt", weights_only=True)
    assert result["moments"] > 50 and result["diff"] == 0.0 and result["lrs"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["v1", "v2"])
def test_a_checkpoint_of_two_sharded_ranks_resumes_in_one_process_to_the_uninterrupted_weights(
    fsdp_runs: Path, case: str
) -> None:
    single = torch.load(fsdp_runs / f"{case}_single.pt", weights_only=True)
    diff = _max_diff(single["resumed"], single["weights"])
    assert diff < 1e-5, f"{case}: resumed weights differ from the uninterrupted run's by {diff:.3g}"
    folder = fsdp_runs / f"{case}.dcp"
    marker = json.loads((folder / "COMPLETE.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 2
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.pth"} <= set(marker["files"])


# --------------------------------------------------------------------------- main.py end to end

BATCH = 16  # 80 train images: 5 optimizer steps per epoch (2 ranks x 8, or 1 x 16)
RUN_OPTS = ["TRAIN.EPOCHS", "2", "TRAIN.STEP_SAVE_FREQ", "2", "PRINT_FREQ", "1"]  # after TINY_RUN_OPTS


def _main_cmd(data: str, output: Path, tag: str, batch: int, *extra: str) -> list[str]:
    return [MAIN, *demo_args(data, output, *extra, tag=tag, batch=batch, opts=RUN_OPTS)]


def _launch_two_ranks(cmd: list[str], marker: str, timeout: float = 120) -> tuple[list[subprocess.Popen], list[str]]:
    """Start ``cmd`` as ranks 0 and 1 of a 2-process group, as torchrun would (its workers run in
    sessions of their own, so killing the launcher would leave them running); read rank 0's
    output until a line holds ``marker``. Returns both processes and rank 0's lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = subprocess.PIPE if rank == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    lines: list[str] = []
    timer = threading.Timer(timeout, lambda: [p.kill() for p in procs])
    timer.start()
    try:
        for line in procs[0].stdout:
            lines.append(line)
            if marker in line:
                return procs, lines
    finally:
        timer.cancel()
    for p in procs:
        p.kill()
        p.wait()
    raise AssertionError(f"{marker!r} never appeared:\n" + "".join(lines[-40:]))


@pytest.mark.slow
def test_sigkilled_two_rank_fsdp_run_resumes_in_one_process_to_the_uninterrupted_weights(
    small_data: str, tmp_path: Path
) -> None:
    from sharded_checkpoint import load_full_model_state_dict

    # The uninterrupted reference: one process, no sharding, the same 16 images per step.
    reference = subprocess.Popen(
        [sys.executable, *_main_cmd(small_data, tmp_path, "reference", BATCH)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        victims, lines = _launch_two_ranks(
            [sys.executable, *_main_cmd(small_data, tmp_path, "victim", BATCH // 2, "--fsdp")], "step checkpoint:"
        )
        for victim in victims:  # both ranks die at once, no handler running, as with a lost node
            victim.kill()
        for victim in victims:
            victim.communicate(timeout=60)
            assert victim.returncode == -signal.SIGKILL
        run_dir = tmp_path / MODEL_NAME / "victim"
        saved = re.search(r"step checkpoint: (\S+) \(epoch (\d+), batch (\d+)\)", lines[-1])
        assert saved is not None, lines[-1]
        assert saved.group(1) == str(run_dir / "ckpt_step_2.dcp")
        # A folder whose save never finished (no COMPLETE.json), newer by its name.
        (run_dir / "ckpt_step_9.dcp").mkdir()
        (run_dir / "ckpt_step_9.dcp" / "__0_0.distcp").write_bytes(b"\0" * 64)

        resumed = subprocess.run(
            [sys.executable, *_main_cmd(small_data, tmp_path, "victim", BATCH, "--fsdp")],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        reference_out, _ = reference.communicate(timeout=180)
    output = resumed.stdout + resumed.stderr
    assert reference.returncode == 0, reference_out[-3000:]
    assert resumed.returncode == 0, output[-4000:]
    assert "--fsdp in a single process: training as 1 rank of a 1-rank group" in output
    assert f"skipping checkpoint {run_dir / 'ckpt_step_9.dcp'}: sharded checkpoint" in output
    assert "is incomplete: it has no COMPLETE.json" in output
    found = re.search(r"resumed weights from (\S+) \(saved by 2 ranks\)", output)
    assert found is not None, output[-3000:]
    # Mid-epoch, at another world size: 2 ranks x 8 images per step are 1 x 16 here.
    position = re.search(r"resuming at epoch (\d+), batch (\d+) \(optimizer step (\d+)\)", output)
    assert position is not None
    epoch, batch, step = map(int, position.groups())
    assert 0 < batch < 5 and step == epoch * 5 + batch

    ref = torch.load(tmp_path / MODEL_NAME / "reference" / "last.pth", weights_only=True)
    got, trainer = load_full_model_state_dict(str(run_dir / "ckpt_epoch_1.dcp"))
    assert (trainer["epoch"], trainer["step"], trainer["world_size"]) == (ref["epoch"], ref["step"], 1) == (1, 10, 1)
    diff = _max_diff(got, ref["model"])
    assert diff < 1e-5, f"resumed sharded run's weights differ from the uninterrupted run's by {diff:.3g}"
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "ckpt_step_9.dcp").exists()

    # export.py makes one file in the release's layout, which --eval, predict and the official code read.
    out = tmp_path / "victim.pth"
    export = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export.py"), str(run_dir / "ckpt_epoch_1.dcp"), "--out", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert export.returncode == 0, export.stdout + export.stderr
    exported = torch.load(out, weights_only=True)["model"]
    assert exported and _max_diff(exported, {k: got[k] for k in exported}) == 0.0
    assert exported.keys() >= {"patch_embed.proj.weight", "layers.3.blocks.1.mlp.fc2.bias", "head.weight"}


# --------------------------------------------------------------------------- one process, no group


def _tiny_model(depths: str = "[2,2,2,2]") -> torch.nn.Module:
    from config import get_config
    from models import build_model

    opts = [*TINY_RUN_OPTS, "MODEL.NUM_CLASSES", "10", "MODEL.SWIN.DEPTHS", depths]
    torch.manual_seed(0)
    return build_model(get_config(DEMO_CFG, opts))


def _save_unsharded(tmp_path: Path, model: torch.nn.Module) -> Path:
    from sharded_checkpoint import save_sharded

    optimizer = torch.optim.AdamW(model.parameters())
    save_sharded(str(tmp_path), "ckpt_epoch_0.dcp", model, optimizer, {"epoch": 0, "step": 5})
    return tmp_path / "ckpt_epoch_0.dcp"


def test_a_sharded_checkpoint_of_another_architecture_is_refused_naming_the_mismatched_parameters(
    tmp_path: Path,
) -> None:
    from errors import UserError
    from sharded_checkpoint import load_sharded

    folder = _save_unsharded(tmp_path, _tiny_model())
    deeper = _tiny_model("[2,2,4,2]")
    with pytest.raises(UserError) as err:
        load_sharded(str(folder), deeper)
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit this architecture (26 mismatched)" in message  # 2 more blocks of 13 tensors
    assert "layers.2.blocks.2." in message and "missing in the checkpoint" in message


def test_incomplete_or_tampered_sharded_folders_are_skipped_by_auto_resume_and_refused_on_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import pickle

    from checkpoint import find_resume_checkpoint, load_checkpoint_file
    from errors import UserError
    from sharded_checkpoint import load_sharded

    model = _tiny_model()
    folder = _save_unsharded(tmp_path, model)
    assert find_resume_checkpoint(str(tmp_path)) == str(folder)
    # A newer folder with a truncated shard file: skipped, the older complete one is taken.
    newer = tmp_path / "ckpt_step_7.dcp"
    newer.mkdir()
    for f in folder.iterdir():
        (newer / f.name).write_bytes(f.read_bytes())
    marker = json.loads((newer / "COMPLETE.json").read_text())
    (newer / "COMPLETE.json").write_text(json.dumps({**marker, "step": 7}))
    assert find_resume_checkpoint(str(tmp_path)) == str(newer)
    shard = newer / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        assert find_resume_checkpoint(str(tmp_path)) == str(folder)
    assert f"skipping checkpoint {newer}" in caplog.text and "__0_0.distcp has 100 bytes of" in caplog.text
    with pytest.raises(UserError, match="is incomplete: __0_0.distcp has 100 bytes"):
        load_sharded(str(newer), model)
    # Every reader of checkpoint files (--pretrained, export, predict) reads a complete folder whole.
    whole = load_checkpoint_file(str(folder))
    assert (whole["epoch"], whole["step"]) == (0, 5)
    assert _max_diff(whole["model"], model.state_dict()) == 0.0
    # An index that would build a foreign object is refused before anything runs.
    (folder / ".metadata").write_bytes(pickle.dumps(os.system))
    marker = json.loads((folder / "COMPLETE.json").read_text())
    marker["files"][".metadata"] = (folder / ".metadata").stat().st_size
    (folder / "COMPLETE.json").write_text(json.dumps(marker))
    with pytest.raises(UserError, match=r"refusing to load .*names (posix|os)\.system"):
        load_sharded(str(folder), model)


def test_weights_gathered_in_bf16_leave_the_simmim_target_in_float32() -> None:
    """The root does not cast its inputs (autocast casts what needs casting): the images reach
    SimMIM's target in float32, as without --fsdp, instead of rounded to bf16."""
    import torch.distributed as dist

    from config import get_config
    from data.simmim import MaskGenerator
    from distributed import DistEnv
    from fsdp import ensure_process_group, shard_model
    from models import build_model

    opts = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]"]
    model = build_model(get_config(str(ROOT / "configs" / "demo" / "simmim_demo_digits.yaml"), opts))
    cpu = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    started = not dist.is_initialized()
    env = ensure_process_group(cpu)
    try:
        shard_model(model, env, torch.bfloat16)
        seen: list[torch.dtype] = []
        target = model.target
        model.target = lambda images: (seen.append(images.dtype), target(images))[1]
        images = torch.rand(2, 3, 32, 32)
        masks = torch.stack([torch.from_numpy(MaskGenerator(32, 8, 2, 0.6)()) for _ in range(2)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(images, masks)
        assert seen == [torch.float32] and torch.isfinite(loss)
    finally:
        if started:
            dist.destroy_process_group()
