"""Parameter groups, learning-rate scaling and per-step schedules (CPU, fast)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import default_config  # noqa: E402
from errors import UserError  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from optimizer import build_optimizer, scaled_lrs  # noqa: E402


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.qkv = nn.Linear(4, 12)


class _TinySwin(nn.Module):
    """Parameter names as in Swin: norms, biases, the rpb table and the absolute position embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 4))
        self.norm = nn.LayerNorm(4)
        self.attn = _Attn()
        self.head = nn.Linear(4, 3)
        self.extra = nn.Parameter(torch.ones(2, 2))  # matrix, excluded only via no_weight_decay()
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"extra"}


def _config(**train):
    cfg = default_config()
    cfg.defrost()
    cfg.TRAIN.EPOCHS = 10
    cfg.TRAIN.WARMUP_EPOCHS = 2
    for k, v in train.items():
        node = cfg.TRAIN
        *parents, leaf = k.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    cfg.freeze()
    return cfg


def _names_by_group(model: nn.Module, opt: torch.optim.Optimizer) -> dict[float, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {ids[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_param_groups_split_decay() -> None:
    model = _TinySwin()
    opt = build_optimizer(_config(WEIGHT_DECAY=0.05), model)
    assert isinstance(opt, torch.optim.AdamW)
    groups = _names_by_group(model, opt)
    assert groups[0.05] == {"attn.qkv.weight", "head.weight"}
    assert groups[0.0] == {
        "absolute_pos_embed",
        "norm.weight",
        "norm.bias",
        "attn.relative_position_bias_table",
        "attn.qkv.bias",
        "head.bias",
        "extra",
    }
    assert opt.defaults["fused"] is True  # 'auto' on the CPU: torch's fused kernels
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_param_groups_through_ddp_style_wrapper() -> None:
    class Wrapper(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self._orig_mod = m  # what torch.compile wraps the model in

    model = _TinySwin()
    opt = build_optimizer(_config(), Wrapper(model))
    assert "extra" in _names_by_group(model, opt)[0.0]


def test_sgd_and_impl_choices() -> None:
    model = _TinySwin()
    opt = build_optimizer(_config(OPTIMIZER__NAME="sgd", OPTIMIZER__IMPL="single"), model)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    assert opt.defaults["foreach"] is False and opt.defaults["fused"] is False


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_auto_takes_foreach_where_torch_refuses_fused_kernels_and_an_explicit_fused_is_a_user_error(
    name: str, monkeypatch
) -> None:
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.SGD

    class NoFusedHere(cls):  # what a torch without fused kernels for the device raises
        def __init__(self, *args, fused=None, **kwargs) -> None:
            super().__init__(*args, fused=fused, **kwargs)  # by now the groups hold fused=True
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of a device")

    monkeypatch.setattr(torch.optim, cls.__name__, NoFusedHere)
    opt = build_optimizer(_config(OPTIMIZER__NAME=name), _TinySwin())
    assert isinstance(opt, NoFusedHere) and opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)  # none kept the failed try's flag
    with pytest.raises(UserError, match=r"TRAIN.OPTIMIZER.IMPL 'fused' does not work here \(`fused=True` requires"):
        build_optimizer(_config(OPTIMIZER__NAME=name, OPTIMIZER__IMPL="fused"), _TinySwin())


@pytest.mark.parametrize("field,value", [("OPTIMIZER__NAME", "lamb"), ("OPTIMIZER__IMPL", "turbo")])
def test_invalid_optimizer_settings_are_user_errors(field: str, value: str) -> None:
    with pytest.raises(UserError, match=value):
        build_optimizer(_config(**{field: value}), _TinySwin())


def test_linear_scaling() -> None:
    cfg = default_config()
    cfg.defrost()
    cfg.DATA.BATCH_SIZE = 128
    cfg.freeze()
    base, warm, low = scaled_lrs(cfg, world_size=8)  # 1024 images = 2 x 512
    assert (base, warm, low) == pytest.approx((1e-3, 1e-6, 1e-5))
    cfg.defrost()
    cfg.TRAIN.ACCUMULATION_STEPS = 4
    cfg.freeze()
    assert scaled_lrs(cfg, world_size=8)[0] == pytest.approx(4e-3)


def _sched(name: str = "cosine", n_iter: int = 10, prefix: bool = True, **train):
    cfg = _config(LR_SCHEDULER__NAME=name, LR_SCHEDULER__WARMUP_PREFIX=prefix, **train)
    opt = build_optimizer(cfg, _TinySwin())
    sched = build_scheduler(cfg, opt, n_iter, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    return cfg, opt, sched


def _lr_at(sched, opt, t: int) -> float:
    sched.step_update(t)
    return opt.param_groups[0]["lr"]


def test_cosine_schedule_values() -> None:
    _, opt, sched = _sched("cosine", n_iter=10)
    # Right after construction the optimizer already holds the warmup lr (step 0).
    assert all(g["lr"] == pytest.approx(1e-6) for g in opt.param_groups)
    assert _lr_at(sched, opt, 0) == pytest.approx(1e-6)
    warmup_end, total = 2 * 10, 10 * 10
    assert _lr_at(sched, opt, warmup_end) == pytest.approx(1e-3)
    assert _lr_at(sched, opt, total - 1) == pytest.approx(1e-5, rel=0.05)
    assert _lr_at(sched, opt, total) == pytest.approx(1e-5)
    after = [_lr_at(sched, opt, t) for t in range(warmup_end, total + 1)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    during = [_lr_at(sched, opt, t) for t in range(0, warmup_end + 1)]
    assert all(a < b for a, b in zip(during, during[1:], strict=False))


@pytest.mark.parametrize("name", ["linear", "step", "multistep"])
def test_other_schedules(name: str) -> None:
    _, opt, sched = _sched(name, n_iter=10, LR_SCHEDULER__DECAY_EPOCHS=3, LR_SCHEDULER__MULTISTEPS=[4, 6])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert _lr_at(sched, opt, 20) == pytest.approx(1e-3)
    values = [_lr_at(sched, opt, t) for t in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    if name == "linear":
        assert _lr_at(sched, opt, 60) == pytest.approx((1e-3 + 1e-5) / 2)
        assert _lr_at(sched, opt, 100) == pytest.approx(1e-5)
        assert _lr_at(sched, opt, 500) == pytest.approx(1e-5)
    elif name == "step":
        # Epochs counted from step 0, warmup included, as the release's StepLRScheduler.
        assert _lr_at(sched, opt, 29) == pytest.approx(1e-3)
        assert _lr_at(sched, opt, 30) == pytest.approx(1e-4)
        assert _lr_at(sched, opt, 60) == pytest.approx(1e-5)
    else:
        assert values[-1] == pytest.approx(1e-5)


@pytest.mark.parametrize("prefix", [True, False])
def test_multistep_decays_at_the_listed_epochs_warmup_included_as_the_release(prefix: bool) -> None:
    """The release's multistep: lr x GAMMA from the first step of each listed epoch, whatever
    WARMUP_PREFIX says (timm's scheduler would decay one step early, and WARMUP_EPOCHS late)."""
    _, opt, sched = _sched("multistep", n_iter=10, prefix=prefix, LR_SCHEDULER__MULTISTEPS=[6, 4])
    assert _lr_at(sched, opt, 19) < 1e-3  # still warming up (2 epochs)
    assert [_lr_at(sched, opt, t) for t in (20, 39, 40, 59, 60, 99)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5]
    )


def test_simmim_pretrain_config_decays_at_epoch_700() -> None:
    from config import get_config

    cfg = get_config(
        str(
            Path(__file__).resolve().parents[1]
            / "configs/simmim/simmim_pretrain__swin_base__img192_window6__800ep.yaml"
        )
    )
    opt = build_optimizer(cfg, _TinySwin())
    sched = build_scheduler(cfg, opt, n_iter_per_epoch=5, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    assert cfg.TRAIN.WARMUP_EPOCHS == 10 and list(cfg.TRAIN.LR_SCHEDULER.MULTISTEPS) == [700]
    assert _lr_at(sched, opt, 700 * 5 - 1) == pytest.approx(1e-3)
    assert _lr_at(sched, opt, 700 * 5) == pytest.approx(1e-4)


def test_a_multistep_epoch_inside_the_warmup_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"MULTISTEPS \[1\] has an epoch before the warmup ends \(epoch 2\)"):
        _sched("multistep", LR_SCHEDULER__MULTISTEPS=[1])


def test_scheduler_state_dict_round_trip() -> None:
    _, opt, sched = _sched("cosine", n_iter=10)
    sched.step_update(37)
    state = sched.state_dict()
    assert "optimizer" not in state
    _, opt2, sched2 = _sched("cosine", n_iter=3)  # different length: the state wins
    sched2.load_state_dict(state)
    for t in (0, 15, 37, 80, 100):
        assert _lr_at(sched2, opt2, t) == pytest.approx(_lr_at(sched, opt, t))


def test_schedule_user_errors() -> None:
    with pytest.raises(UserError, match="WARMUP_EPOCHS"):
        _sched("cosine", WARMUP_EPOCHS=10)
    with pytest.raises(UserError, match="no optimizer step"):
        _sched("cosine", n_iter=0)
    with pytest.raises(UserError, match="LR_SCHEDULER.NAME"):
        _sched("exponential")


def test_no_warmup_starts_at_base_lr() -> None:
    _, opt, sched = _sched("cosine", WARMUP_EPOCHS=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert _lr_at(sched, opt, 50) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))


def test_resuming_keeps_this_runs_optimizer_implementation_not_the_checkpoints():
    """A checkpoint written by a fused (CUDA) AdamW resumed by a foreach one, and the reverse:
    the moments and step come from the file, the implementation flags stay this run's."""
    from optimizer import load_optimizer_state

    model = nn.Linear(4, 3)
    writer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    model(torch.randn(2, 4)).sum().backward()
    writer.step()
    saved = writer.state_dict()
    for group in saved["param_groups"]:  # as a fused CUDA run writes it
        group["fused"], group["foreach"] = True, None

    reader = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=True)
    load_optimizer_state(reader, saved)
    assert all(g["foreach"] is True and not g["fused"] for g in reader.param_groups)
    assert reader.param_groups[0]["lr"] == 1e-3  # the saved lr, as load_state_dict gives
    p = next(model.parameters())
    torch.testing.assert_close(reader.state[p]["exp_avg"], writer.state[p]["exp_avg"])
    # Without the helper, plain load_state_dict takes the file's flags.
    plain = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=True)
    plain.load_state_dict(saved)
    assert plain.param_groups[0]["fused"] is True
