"""The training loop's contract: learning, accumulation, non-finite losses, corrupt-image accounting."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from config import get_config
from distributed import DistEnv, make_grad_scaler
from engine import StepHooks, TrainState, evaluate, train_one_epoch
from errors import UserError
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer

TINY = [
    "DATA.IMG_SIZE",
    "32",
    "MODEL.SWIN.PATCH_SIZE",
    "2",
    "MODEL.SWIN.WINDOW_SIZE",
    "4",
    "MODEL.SWIN.EMBED_DIM",
    "16",
    "MODEL.SWIN.NUM_HEADS",
    "[1,2,4,8]",
    "MODEL.SWIN.DEPTHS",
    "[2,2,2,2]",
    "MODEL.NUM_CLASSES",
    "5",
    "MODEL.DROP_PATH_RATE",
    "0.0",
    "AMP_ENABLE",
    "False",
    "TRAIN.WARMUP_EPOCHS",
    "0",
    "TRAIN.EPOCHS",
    "10",
    "PRINT_FREQ",
    "1000",
]
CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)


def _setup(opts=(), seed=0):
    torch.manual_seed(seed)
    config = get_config(None, TINY + list(opts))
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, 4, 1e-3, 1e-6, 1e-5)
    scaler = make_grad_scaler(CPU.device, False, None)
    return config, model, optimizer, scheduler, scaler


def _batches(n, batch=4, seed=1, replaced=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        names = tuple((replaced or {}).get((i, j), "") for j in range(batch))
        out.append((torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g), names))
    return out


def _hooks():
    return StepHooks(save_step_checkpoint=lambda: None, stop_requested=lambda: False)


def _epoch(config, model, optimizer, scheduler, scaler, loader, criterion=None, state=None):
    state = state or TrainState()
    stats = train_one_epoch(
        config,
        model,
        criterion or nn.CrossEntropyLoss(),
        loader,
        optimizer,
        scheduler,
        scaler,
        None,
        CPU,
        state,
        _hooks(),
    )
    return stats, state


def test_loss_falls_on_a_fixed_batch():
    config, model, optimizer, scheduler, scaler = _setup()
    batch = _batches(1, batch=8)
    first, _ = _epoch(config, model, optimizer, scheduler, scaler, batch)
    for _ in range(15):
        last, _ = _epoch(config, model, optimizer, scheduler, scaler, batch)
    assert last["loss"] < 0.5 * first["loss"]


def test_two_accumulated_half_batches_equal_one_full_batch_step():
    # SGD: its update is proportional to the gradient, so equal weights mean equal gradients (Adam's
    # first step is about lr * sign(g) and would magnify rounding in near-zero gradients).
    sgd = ["TRAIN.OPTIMIZER.NAME", "sgd"]
    full = _batches(1, batch=8)
    images, targets, names = full[0]
    halves = [(images[:4], targets[:4], names[:4]), (images[4:], targets[4:], names[4:])]
    config1, model1, opt1, sched1, scaler1 = _setup(sgd)
    _epoch(config1, model1, opt1, sched1, scaler1, full)
    config2, model2, opt2, sched2, scaler2 = _setup(sgd + ["TRAIN.ACCUMULATION_STEPS", "2"])
    _, state = _epoch(config2, model2, opt2, sched2, scaler2, halves)
    assert state.step == 1
    for (name, a), b in zip(model1.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


class _NanOn(nn.Module):
    """Cross-entropy that turns non-finite on the listed calls."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad, self.calls = set(bad_calls), 0

    def forward(self, out, target):
        loss = nn.functional.cross_entropy(out, target)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 in self.bad else loss


def test_a_non_finite_loss_skips_the_update_and_is_counted():
    config, model, optimizer, scheduler, scaler = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, state = _epoch(config, model, optimizer, scheduler, scaler, _batches(1), criterion=_NanOn({0}))
    assert state.nonfinite_total == 1 and state.nonfinite_in_row == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    # The next finite step updates again and resets the run of failures.
    _, state = _epoch(config, model, optimizer, scheduler, scaler, _batches(1), state=state)
    assert state.nonfinite_in_row == 0 and state.nonfinite_total == 1
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_too_many_non_finite_losses_in_a_row_stop_the_run_with_a_clear_message():
    config, model, optimizer, scheduler, scaler = _setup(["TRAIN.MAX_NONFINITE_STEPS", "3"])
    with pytest.raises(UserError, match="3 non-finite losses in a row .*last good checkpoint"):
        _epoch(config, model, optimizer, scheduler, scaler, _batches(5), criterion=_NanOn({0, 1, 2, 3, 4}))


def test_replaced_images_are_logged_once_and_counted_per_epoch(caplog):
    config, model, optimizer, scheduler, scaler = _setup()
    loader = _batches(3, replaced={(0, 1): "bad/a.png", (2, 0): "bad/a.png", (2, 3): "bad/b.jpg"})
    with caplog.at_level(logging.WARNING, logger="swin"):
        stats, state = _epoch(config, model, optimizer, scheduler, scaler, loader)
    assert stats["corrupt_images"] == 3
    named = [r.getMessage() for r in caplog.records if "unreadable image replaced" in r.getMessage()]
    assert sorted(named) == [
        "unreadable image replaced by another sample: bad/a.png",
        "unreadable image replaced by another sample: bad/b.jpg",
    ]


def test_evaluate_counts_every_image_and_reports_top1_top5():
    config, model, *_ = _setup()
    loader = _batches(3, batch=5)
    stats = evaluate(config, loader, model, CPU)
    assert stats["count"] == 15
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _, _ in loader])
    targets = torch.cat([t for _, t, _ in loader])
    top1 = (logits.argmax(1) == targets).float().mean().item() * 100
    assert stats["acc1"] == pytest.approx(top1)
    assert stats["acc5"] == pytest.approx(100.0)  # 5 classes: the top 5 always hold the target
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
