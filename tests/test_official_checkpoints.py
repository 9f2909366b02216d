"""Training checkpoints of the official release: --eval --resume, --pretrained, --resume, and the scripts.

The fixture writes a checkpoint the way the release's ``save_checkpoint`` does: ``torch.save`` of
model, optimizer (AdamW over its [decay, no_decay] groups, after a few real steps), a timm
CosineLRScheduler's state, the GradScaler's state, epoch, max accuracy and the run's yacs CfgNode,
pickled whole (with keys only the release has). Loading it must allow exactly that class: a
CfgNode-bearing file that holds any other object is refused before anything runs.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode

import checkpoint as ck
import main as main_module
from config import config_from_yaml_text, get_config
from errors import UserError
from models import build_model
from models.pretrained import DERIVED_KEYS
from tests.conftest import DEMO_CFG, ROOT, TINY_RUN_OPTS

sys.path.insert(0, os.path.join(ROOT, "scripts"))

import explain  # noqa: E402
import export  # noqa: E402
import predict  # noqa: E402

ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)")
BATCH = 16
EPOCHS = 2  # the release's run stopped after epoch 0 of 2
MAX_ACCURACY = 97.5  # higher than the tiny model reaches: a carried-over value shows as itself
OPTS = [*TINY_RUN_OPTS, "MODEL.NUM_CLASSES", "10", "DATA.BATCH_SIZE", str(BATCH), "TRAIN.EPOCHS", str(EPOCHS)]


def _release_config(data: str) -> CfgNode:
    """A yacs CfgNode as the release's get_config leaves it: its keys, lrs scaled by the batch."""
    cfg = get_config(DEMO_CFG, OPTS)
    cfg.defrost()
    cfg.DATA.DATA_PATH = data
    factor = BATCH / 512.0  # the release's main.py scales the lrs in the config itself
    cfg.TRAIN.BASE_LR *= factor
    cfg.TRAIN.WARMUP_LR *= factor
    cfg.TRAIN.MIN_LR *= factor
    cfg.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
    cfg.TRAIN.MOE = CfgNode({"SAVE_MASTER": False})  # release-only keys
    cfg.MODEL.SWIN_MLP = CfgNode({"EMBED_DIM": 96, "DEPTHS": [2, 2, 6, 2]})
    cfg.OUTPUT = "output/swin_demo_digits/default"
    cfg.freeze()
    return cfg


def _release_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The release's set_weight_decay, spelled out: [decay, no_decay], named_parameters order."""
    skip, keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim == 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _release_state_dict(model: torch.nn.Module) -> collections.OrderedDict:
    """The model's state_dict with the buffers the release keeps (relative_position_index,
    attn_mask of shifted blocks), in its order: a module's own tensors before its children's."""
    out: collections.OrderedDict = collections.OrderedDict()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if dot.startswith("layers.") and ".blocks." in dot and dot.count(".") == 4 and int(dot.split(".")[3]) % 2:
            out[f"{dot}attn_mask"] = torch.zeros(4, 16, 16)
        for name, p in module.named_parameters(recurse=False):
            out[dot + name] = p.detach().clone()
        for name, b in module.named_buffers(recurse=False):
            if name in DERIVED_KEYS:  # not the shift mask and permutation this project's blocks hold
                out[dot + name] = b.clone()
    return out


@pytest.fixture(scope="module")
def release(small_data: str, tmp_path_factory) -> dict:
    """An epoch-0 training checkpoint of the tiny demo model, saved as the release saves it."""
    folder = tmp_path_factory.mktemp("release")
    cfg = _release_config(small_data)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(
        _release_param_groups(model, cfg.TRAIN.WEIGHT_DECAY),
        lr=cfg.TRAIN.BASE_LR,
        eps=cfg.TRAIN.OPTIMIZER.EPS,
        betas=cfg.TRAIN.OPTIMIZER.BETAS,
        weight_decay=cfg.TRAIN.WEIGHT_DECAY,
    )
    steps_per_epoch = 80 // BATCH  # small_data: 10 classes x 8 training images
    lr_scheduler = CosineLRScheduler(
        optimizer,
        t_initial=EPOCHS * steps_per_epoch,
        cycle_mul=1.0,
        lr_min=cfg.TRAIN.MIN_LR,
        warmup_lr_init=cfg.TRAIN.WARMUP_LR,
        warmup_t=0,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=True,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for idx in range(steps_per_epoch):  # epoch 0, on random images
        x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_scheduler.step_update(0 * steps_per_epoch + idx)  # as the release: (epoch * num_steps + idx)
    model.eval()
    save_state = {
        "model": _release_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "max_accuracy": MAX_ACCURACY,
        "scaler": scaler.state_dict(),
        "epoch": 0,
        "config": cfg,
    }
    path = folder / "ckpt_epoch_0.pth"
    torch.save(save_state, path)
    # The same weights as one of our own checkpoints, to compare evaluations against.
    ours = folder / "ours.pth"
    ck.save_checkpoint(str(ours), {"model": model.state_dict(), "epoch": 0, "config": ck.config_yaml(cfg)})
    moments = {
        name: optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters() if p in optimizer.state
    }
    image = sorted(Path(small_data, "val", "3").iterdir())[0]
    return {
        "path": str(path),
        "ours": str(ours),
        "data": small_data,
        "model": model,
        "moments": moments,
        "image": image,
    }


def _args(data: str, output: Path, *extra: str, opts: tuple[str, ...] = ()) -> list[str]:
    return [
        *("--cfg", DEMO_CFG, "--data-path", data, "--output", str(output), "--device", "cpu"),
        *("--batch-size", str(BATCH), *extra, "--opts", *OPTS, *opts),
    ]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- loading


def test_the_pickled_cfgnode_loads_as_yaml_text_and_rebuilds_the_config(release):
    with pytest.raises(Exception):  # noqa: B017 - plain weights-only loading refuses the CfgNode
        torch.load(release["path"], weights_only=True)
    loaded = ck.load_checkpoint_file(release["path"])
    assert isinstance(loaded["config"], str) and loaded["epoch"] == 0 and loaded["max_accuracy"] == MAX_ACCURACY
    config = config_from_yaml_text(loaded["config"])
    assert config.MODEL.SWIN.EMBED_DIM == 16 and config.MODEL.NUM_CLASSES == 10 and config.DATA.IMG_SIZE == 32
    assert list(config.TRAIN.OPTIMIZER.BETAS) == [0.9, 0.999] and "SWIN_MLP" not in config.MODEL
    # The resume scan reads it as well (epoch 0, no step).
    assert ck.find_resume_checkpoint(os.path.dirname(release["path"])) == release["path"]


def test_optimizer_state_is_matched_to_parameters_by_name_not_by_position(release):
    from optimizer import build_optimizer

    model = release["model"]
    params = dict(model.named_parameters())
    names = list(params)
    name_of = {id(p): n for n, p in params.items()}
    saved_order = names[::-1]  # a release whose modules register their parameters the other way round
    groups, state, base = [], {}, 0
    for group in _release_param_groups(model, 0.05):
        ids = {id(p) for p in group["params"]}
        members = [n for n in saved_order if id(params[n]) in ids]
        for j, n in enumerate(members):  # each moment marked with its parameter's place in our model
            mark = torch.full(params[n].shape, float(names.index(n)))
            state[base + j] = {"step": torch.tensor(3.0), "exp_avg": mark, "exp_avg_sq": torch.ones(params[n].shape)}
        hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": group["weight_decay"]}
        groups.append({**hyper, "params": list(range(base, base + len(members)))})
        base += len(members)
    saved = {"state": state, "param_groups": groups}
    optimizer = build_optimizer(get_config(DEMO_CFG, OPTS), model)
    remapped, why = ck.remap_optimizer_state(saved, model, optimizer, saved_order)
    assert why == "" and remapped is not None
    ours = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert len(remapped["state"]) == len(ours)
    assert all(torch.all(remapped["state"][i]["exp_avg"] == names.index(n)) for i, n in enumerate(ours))
    # A moment of another shape (the groups' parameters mismatched) is caught, not loaded.
    state[0]["exp_avg"] = torch.zeros(7)
    remapped, why = ck.remap_optimizer_state(saved, model, optimizer, saved_order)
    assert remapped is None and "has shape (7,)" in why


def test_without_the_cfgnode_allowance_the_file_is_refused_asking_for_a_newer_torch(release, monkeypatch):
    import contextlib

    monkeypatch.setattr(ck, "_yacs_config_allowed", contextlib.nullcontext)
    with pytest.raises(UserError, match=r"needs torch 2\.6 or newer"):
        ck.load_checkpoint_file(release["path"])


class _Evil:
    """Unpickling this creates a marker file (stands in for os.system)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["value", "attribute", "beside"])
def test_a_cfgnode_checkpoint_with_any_other_class_is_refused_in_one_line(
    release, tmp_path: Path, capsys, where: str
) -> None:
    marker = tmp_path / "PWNED"
    cfg = get_config(DEMO_CFG, OPTS)
    cfg.defrost()
    payload = {"model": release["model"].state_dict(), "epoch": 0, "config": cfg}
    if where == "value":
        cfg["EVIL"] = _Evil(str(marker))
    elif where == "attribute":  # in the CfgNode's own state, which unpickling sets as attributes
        cfg.__dict__["evil"] = _Evil(str(marker))
    else:
        payload["x"] = _Evil(str(marker))
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    with pytest.raises(UserError, match=r"refusing to load .*pickled Python objects \((builtins\.|_?io\.)?open\)"):
        ck.load_checkpoint_file(str(path))
    assert main_module.main(_args(release["data"], tmp_path, "--resume", str(path))) == 2
    assert f"refusing to load {path}: it holds pickled Python objects" in _one_error_line(capsys.readouterr().err)
    assert predict.main(["--resume", str(path), str(release["image"]), "--device", "cpu"]) == 2
    _one_error_line(capsys.readouterr().err)
    assert not marker.exists()


# --------------------------------------------------------------------------- main.py


def test_eval_resume_gives_the_accuracy_of_the_same_weights_in_our_checkpoint(release, tmp_path, capsys):
    found = []
    for tag, path in (("official", release["path"]), ("ours", release["ours"])):
        assert main_module.main(_args(release["data"], tmp_path, "--tag", tag, "--eval", "--resume", path)) == 0
        out = capsys.readouterr().out
        found.append(ACC_LINE.findall(out))
        assert "Train:" not in out
    assert len(found[0]) == 1 and found[0] == found[1]


def test_resume_continues_the_release_run_with_its_optimizer_epoch_and_best_accuracy(release, tmp_path, capsys):
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer, scaled_lrs

    # The state as main.py restores it, before any training step.
    config = get_config(DEMO_CFG, OPTS)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    base_lr, warmup_lr, min_lr = scaled_lrs(config, 1)
    scheduler = build_scheduler(config, optimizer, 80 // BATCH, base_lr, warmup_lr, min_lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)  # an enabled scaler takes the release's state
    state = main_module.TrainState()
    env = main_module.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    log = logging.getLogger("test.official")
    main_module.load_resume(
        release["path"], model, optimizer, scheduler, scaler, state, env, log, model_only=False, steps_per_epoch=5
    )
    assert (state.epoch, state.step, state.max_accuracy) == (1, 5, MAX_ACCURACY)
    params = dict(model.named_parameters())
    assert release["moments"] and all(
        torch.equal(optimizer.state[params[n]]["exp_avg"], m) for n, m in release["moments"].items()
    )
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert scaler.get_scale() == 1024.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler._get_lr(5)[0])

    # And end to end: only epoch 1 is trained, the best accuracy and the optimizer's steps go on.
    assert main_module.main(_args(release["data"], tmp_path, "--tag", "resume", "--resume", release["path"])) == 0
    out = capsys.readouterr().out
    assert "training checkpoint of the official release: epoch 0 done, best accuracy 97.50%" in out
    assert "optimizer: the release's state loaded" in out
    assert "lr schedule: the release's equals this run's, carried over at step 5" in out
    assert "loss scaler: not used by this run" in out
    assert "resuming at epoch 1 (optimizer step 5)" in out
    assert "Train: [1/2]" in out and "Train: [0/2]" not in out
    last = ck.load_checkpoint_file(str(tmp_path / "swin_demo_digits" / "resume" / "last.pth"))
    assert (last["epoch"], last["step"], last["max_accuracy"]) == (1, 10, MAX_ACCURACY)
    steps = {float(s["step"]) for s in last["optimizer"]["state"].values()}
    assert steps == {10.0}  # 5 steps of the release's epoch 0, 5 of ours


def test_resume_with_other_groups_or_schedule_starts_a_fresh_optimizer_and_rebuilds_the_schedule(
    release, tmp_path, capsys
):
    checkpoint = ck.load_checkpoint_file(release["path"])
    groups = checkpoint["optimizer"]["param_groups"]
    checkpoint["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    path = tmp_path / "one_group.pth"
    torch.save(checkpoint, path)  # config as YAML text, no 'step': still the release's layout
    args = _args(release["data"], tmp_path, "--tag", "regroup", "--resume", str(path), opts=("TRAIN.EPOCHS", "3"))
    assert main_module.main(args) == 0
    out = capsys.readouterr().out
    assert "optimizer: the release's state does not fit this run (it has 1 parameter groups, this run 2)" in out
    assert "lr schedule: rebuilt from this run's config at step 5" in out and "t_initial 10 vs 15" in out
    assert "Train: [1/3]" in out and "Train: [2/3]" in out


def test_pretrained_fine_tunes_from_the_release_checkpoint(release, tmp_path, capsys):
    assert main_module.main(_args(release["data"], tmp_path, "--tag", "ft", "--pretrained", release["path"])) == 0
    out = capsys.readouterr().out
    assert f"loaded {release['path']} for finetune: " in out and "head loaded" in out
    assert "Train: [0/2]" in out  # a fine-tuning run starts at epoch 0 with its own optimizer
    assert "official release" not in out


# --------------------------------------------------------------------------- scripts


def test_predict_explain_and_export_read_the_release_checkpoint(release, tmp_path, capsys):
    image = str(release["image"])
    model, config, _ = predict.load_classifier(release["path"])
    assert config.MODEL.SWIN.EMBED_DIM == 16 and config.MODEL.NUM_CLASSES == 10
    saved = release["model"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert predict.main(["--resume", release["path"], image, "--json", "--device", "cpu"]) == 0
    official = json.loads(capsys.readouterr().out)
    assert predict.main(["--resume", release["ours"], image, "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == official

    assert explain.main(["--resume", release["path"], "--image", image, "--out", str(tmp_path / "explain")]) == 0
    top = official[0]["top"][0]
    assert f"prediction for {image}: {top['class']} ({100 * top['prob']:.1f}%)" in capsys.readouterr().out

    out = str(tmp_path / "release.safetensors")
    assert export.main([release["path"], "--out", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {len(saved)} tensors (official layout) to {out}"
    exported = ck.load_checkpoint_file(out)
    assert config_from_yaml_text(exported["config"]).MODEL.SWIN.EMBED_DIM == 16
    assert predict.main(["--resume", out, image, "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == [{**official[0]}]
