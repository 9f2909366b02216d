"""The loops' contract: learning, accumulation, non-finite losses, corrupt-image accounting, exact evaluation."""

from __future__ import annotations

import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT

from config import get_config
from data import build_loader
from distributed import DistEnv, make_grad_scaler
from engine import OptimizerStep, StepHooks, TrainState, _grad_norm, eval_summary, evaluate, train_one_epoch
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


class _Dataset:
    """What the loops read from a loader's dataset: a log of unreadable samples and their names."""

    def __init__(self, names: dict[int, str], n: int) -> None:
        from data.robust import ReplacementLog

        self.names, self.replacements = names, ReplacementLog(n)

    def sample_name(self, index: int) -> str:
        return self.names[index]


class _Loader(list):
    """Batches ``(images, targets)`` over a ``_Dataset``; the unreadable rows are marked in its log
    as the batches are produced (what a dataset does in a loader worker)."""

    def __init__(self, batches, batch: int, replaced: dict) -> None:
        super().__init__(batches)
        self.batch, self.replaced = batch, replaced
        self.dataset = _Dataset({i * batch + j: name for (i, j), name in replaced.items()}, len(batches) * batch)

    def __iter__(self):
        for i, b in enumerate(list.__iter__(self)):
            for j in range(self.batch):
                if (i, j) in self.replaced:
                    self.dataset.replacements.mark(i * self.batch + j)
            yield b


def _batches(n, batch=4, seed=1, replaced=None, placeholders=False):
    """``n`` random batches; ``replaced`` {(batch, row): name} marks unreadable samples, whose
    targets are -1 with ``placeholders`` (a validation set's rows)."""
    g = torch.Generator().manual_seed(seed)
    replaced = replaced or {}
    out = []
    for i in range(n):
        images, targets = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g)
        if placeholders:
            for j in range(batch):
                if (i, j) in replaced:
                    targets[j] = -1
        out.append((images, targets))
    return _Loader(out, batch, replaced)


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
    images, targets = full[0]
    halves = [(images[:4], targets[:4]), (images[4:], targets[4:])]
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
    # 12 classes, so top-5 is a real cut (with 5 classes it would always be 100 %).
    config, model, *_ = _setup(["MODEL.NUM_CLASSES", "12"])
    g = torch.Generator().manual_seed(5)
    loader = [(torch.randn(5, 3, 32, 32, generator=g), torch.randint(0, 12, (5,), generator=g)) for _ in range(3)]
    stats = evaluate(config, loader, model, CPU)
    assert stats["count"] == 15
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in loader])
    targets = torch.cat([t for _, t in loader])
    # Counted independently: the rank of each target's logit among the 12.
    rank = (logits > logits.gather(1, targets[:, None])).sum(1)
    assert stats["acc1"] == pytest.approx((rank == 0).float().mean().item() * 100)
    assert stats["acc5"] == pytest.approx((rank < 5).float().mean().item() * 100)
    assert 0 < stats["acc5"] < 100  # the fixed seed gives a case where top-5 matters
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch < 2.6 compiles the last batch again")
def test_a_block_compiled_models_smaller_last_val_batch_runs_eagerly_instead_of_compiling_again():
    """Training-time validation of a ``--compile`` run: each block variant is compiled for eval at
    the first batch's size; the smaller last batch would compile them all again."""
    import copy

    import torch._dynamo

    from models import compile_model

    config, model, *_ = _setup(["MODEL.NUM_CLASSES", "12"])
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    graphs.clear()
    compile_model(model, "blocks", "eager")  # Dynamo's guards and graphs alone: what decides a recompile
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 12, (n,), generator=g)) for n in (5, 5, 3)]
    try:
        evaluate(config, batches[:2], model, CPU)
        compiled = graphs["unique_graphs"]
        assert compiled >= 6  # every distinct block compiled, for eval at batch 5
        stats = evaluate(config, batches, model, CPU)
        assert graphs["unique_graphs"] == compiled  # the batch of 3 compiled nothing
    finally:
        torch._dynamo.reset()
    reference = evaluate(config, batches, eager, CPU)
    assert stats["count"] == reference["count"] == 13
    assert stats["acc1"] == reference["acc1"] and stats["loss"] == pytest.approx(reference["loss"], rel=1e-5)


# -----------------------------------------------------------------------------
# Evaluation with unreadable validation images: named, excluded, never substituted
# -----------------------------------------------------------------------------
DEMO_CFG = os.path.join(ROOT, "configs", "demo", "swin_demo_digits.yaml")
TINY_DEMO = [
    "DATA.IMG_SIZE",
    "32",
    "MODEL.SWIN.EMBED_DIM",
    "16",
    "MODEL.SWIN.NUM_HEADS",
    "[1,2,4,8]",
    "MODEL.SWIN.DEPTHS",
    "[2,2,2,2]",
    "MODEL.NUM_CLASSES",
    "10",
    "DATA.NUM_WORKERS",
    "0",
    "DATA.BATCH_SIZE",
    "4",
    "AMP_ENABLE",
    "False",
    "PRINT_FREQ",
    "1000",
]
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)")


def _demo_eval(data_path, *opts):
    """``evaluate`` as ``main.py --eval`` runs it on ``data_path``, with one fixed tiny model."""
    config = get_config(DEMO_CFG, TINY_DEMO + ["DATA.DATA_PATH", str(data_path), *opts])
    torch.manual_seed(3)
    model = build_model(config)
    return evaluate(config, build_loader(config, 1, 0).loader_val, model, CPU)


def _summary_lines(caplog):
    return [r.getMessage() for r in caplog.records if ACC_LINE.search(r.getMessage())]


@pytest.fixture
def val_with_bad_png(small_data, tmp_path):
    """``small_data`` (15 val images) plus ``val/3/bad.png`` holding random bytes, and the clean copy."""
    bad_root = tmp_path / "with_bad"
    shutil.copytree(small_data, bad_root)
    bad = bad_root / "val" / "3" / "bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(2000))
    return {"clean": small_data, "bad": bad_root, "bad_file": str(bad)}


def test_evaluate_names_an_unreadable_val_image_and_scores_only_the_readable_ones(val_with_bad_png, caplog):
    with caplog.at_level(logging.INFO, logger="swin"):
        clean = _demo_eval(val_with_bad_png["clean"])
        clean_lines = _summary_lines(caplog)
        caplog.clear()
        stats = _demo_eval(val_with_bad_png["bad"])
        lines = _summary_lines(caplog)
    assert stats["count"] == clean["count"] == 15 and stats["total"] == 16
    assert stats["unreadable"] == [val_with_bad_png["bad_file"]]
    # Exactly the metrics of the folder without the file: no stand-in image was scored.
    assert (stats["acc1"], stats["acc5"]) == (clean["acc1"], clean["acc5"])
    assert stats["loss"] == pytest.approx(clean["loss"], rel=1e-5)
    # Without unreadable files the line is as it always was; with one it says so after the count.
    assert clean_lines == [f" * Acc@1 {clean['acc1']:.3f} Acc@5 {clean['acc5']:.3f} loss {clean['loss']:.4f} images 15"]
    assert len(lines) == 1 and ACC_LINE.search(lines[0]).group(4) == "15"
    assert lines[0].endswith(f"images 15 of 16, 1 unreadable: {os.path.join('val', '3', 'bad.png')}")
    assert [r.levelno for r in caplog.records if ACC_LINE.search(r.getMessage())] == [logging.WARNING]


def test_strict_evaluation_fails_with_one_line_naming_the_unreadable_image(val_with_bad_png):
    with pytest.raises(UserError) as err:
        _demo_eval(val_with_bad_png["bad"], "DATA.STRICT", "True")
    message = str(err.value)
    assert "\n" not in message and val_with_bad_png["bad_file"] in message


def test_evaluate_leaves_placeholder_rows_out_and_names_them_from_the_datasets_log():
    config, model, *_ = _setup()
    flagged = {(0, 1): "val/a.png", (2, 0): "val/b.png", (2, 4): "val/c.png"}
    loader = _batches(3, batch=5, replaced=flagged, placeholders=True)
    stats = evaluate(config, loader, model, CPU)
    readable = [
        (x[[j for j in range(5) if (i, j) not in flagged]], t[[j for j in range(5) if (i, j) not in flagged]])
        for i, (x, t) in enumerate(loader)
    ]
    reference = evaluate(config, readable, model, CPU)
    assert stats["count"] == reference["count"] == 12 and stats["total"] == 15
    assert stats["unreadable"] == ["val/a.png", "val/b.png", "val/c.png"]
    assert (stats["acc1"], stats["acc5"]) == (reference["acc1"], reference["acc5"])
    assert stats["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert reference["total"] == 12 and reference["unreadable"] == []


def test_a_val_set_with_no_readable_image_is_a_one_line_user_error():
    config, model, *_ = _setup()
    loader = _batches(1, batch=2, replaced={(0, 0): "val/a.png", (0, 1): "val/b.png"}, placeholders=True)
    with pytest.raises(UserError, match=r"none of the 2 validation images could be read \(e\.g\. val/a\.png"):
        evaluate(config, loader, model, CPU)


def test_summary_names_three_unreadable_files_and_counts_the_rest():
    result = {"acc1": 50.0, "acc5": 100.0, "loss": 1.25, "count": 5, "total": 10}
    paths = [f"/data/val/{c}/x.png" for c in "abcde"]
    line = eval_summary({**result, "unreadable": paths}, "/data")
    assert line == (
        " * Acc@1 50.000 Acc@5 100.000 loss 1.2500 images 5 of 10, 5 unreadable: "
        "val/a/x.png, val/b/x.png, val/c/x.png (+2 more)"
    )
    assert eval_summary({**result, "unreadable": []}) == " * Acc@1 50.000 Acc@5 100.000 loss 1.2500 images 5"
    # Files outside the data folder keep their full path.
    outside = eval_summary({**result, "total": 6, "unreadable": ["/elsewhere/y.png"]}, "/data")
    assert outside.endswith("images 5 of 6, 1 unreadable: /elsewhere/y.png")


def test_a_slow_loader_shows_as_the_data_share_of_the_step(caplog):
    import time as time_module

    config, model, optimizer, scheduler, scaler = _setup()
    batches = _batches(3)

    class SlowLoader:
        def __len__(self):
            return len(batches)

        def __iter__(self):
            for b in batches:
                time_module.sleep(0.3)  # far longer than a step of the tiny model
                yield b

    with caplog.at_level(logging.INFO, logger="swin"):
        stats, _ = _epoch(config, model, optimizer, scheduler, scaler, SlowLoader())
    # Each step waited at least the loader's sleep, and the share is that wait over the step time.
    assert stats["data_seconds"] >= 0.29
    expected_share = 100 * len(batches) * stats["data_seconds"] / stats["seconds"]
    assert stats["data_share_percent"] == pytest.approx(expected_share, rel=0.2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Train:")]
    assert lines and all(re.search(r"\tdata 0\.\d{4} \(0\.\d{4}, \d+%\)\t", line) for line in lines)


def test_the_loss_meter_reads_the_device_only_when_logged_and_averages_like_the_items():
    from engine import DeviceMean

    meter = DeviceMean()
    values = [(torch.tensor(2.0), 4), (torch.tensor(1.0), 4), (torch.tensor(0.5), 2)]
    for v, n in values:
        meter.update(v, n)
    assert meter.val == 0.5
    assert meter.avg == pytest.approx((2.0 * 4 + 1.0 * 4 + 0.5 * 2) / 10)
    assert DeviceMean().avg == 0.0 and DeviceMean().val == 0.0


def test_the_gradient_norm_meter_leaves_out_the_norms_of_skipped_steps():
    from engine import DeviceMean

    meter = DeviceMean(finite_only=True)
    meter.update(torch.tensor(float("nan")))  # a skipped first step counts for nothing
    assert meter.val == 0.0 and meter.avg == 0.0
    for v in (3.0, float("inf"), 1.0, float("nan")):
        meter.update(torch.tensor(v))
    assert meter.val == 1.0  # the last finite norm
    assert meter.avg == pytest.approx(2.0)
    plain = DeviceMean()
    plain.update(torch.tensor(float("inf")))
    assert plain.avg == float("inf")  # without finite_only nothing is left out


def test_the_reconstruction_summary_names_unreadable_files_as_the_classification_one_does():
    result = {"loss": 0.5, "count": 5, "total": 7, "unreadable": ["/d/val/a.png", "/d/val/b.png"]}
    expected = " * reconstruction loss 0.5000 images 5 of 7, 2 unreadable: val/a.png, val/b.png"
    assert eval_summary(result, "/d") == expected


def test_correct_in_top_counts_rows_whose_target_is_among_the_k_largest_logits():
    from engine import correct_in_top

    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.7], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 2, 0, 2])
    top1, top2, top3 = correct_in_top(output, target, (1, 2, 3))
    # Row 0 top-1; row 1's target is second; row 2's is last; row 3's is last.
    assert (int(top1), int(top2), int(top3)) == (1, 2, 4)
    assert top1.device == output.device and top1.dtype == torch.int64


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("skipped", [(1, 2), (0,)], ids=["later", "first"])
def test_a_skipped_step_leaves_no_trace_and_is_counted_when_the_epoch_ends(impl, name, skipped):
    # fused: the skip is decided on the optimizer's device (found_inf); foreach: on the host.
    # A skipped first step is the fp16 scaler's usual start, and fused SGD's momentum is created then.
    opts = ["TRAIN.OPTIMIZER.IMPL", impl, "TRAIN.OPTIMIZER.NAME", name]
    config, model, optimizer, scheduler, scaler = _setup(opts)
    batches = _batches(4)
    _, state = _epoch(config, model, optimizer, scheduler, scaler, batches, criterion=_NanOn(set(skipped)))
    assert state.step == 4 and state.nonfinite_total == len(skipped) and state.nonfinite_in_row == 0
    # The same run by hand without the skipped batches (the schedule still advances): equal weights,
    # so a skipped step updated no moment, momentum, step count or weight decay.
    config, ref, ref_opt, ref_sched, _ = _setup(opts)
    ref.train()
    for i, (images, targets) in enumerate(batches):
        if i not in skipped:
            nn.functional.cross_entropy(ref(images), targets).backward()
            _grad_norm(ref.parameters(), config.TRAIN.CLIP_GRAD)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        ref_sched.step_update(i + 1)
    for (key, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    if name == "adamw":
        assert {int(s["step"]) for s in optimizer.state.values()} == {4 - len(skipped)}


def test_with_a_fused_optimizer_a_step_reads_nothing_back_to_the_host(monkeypatch):
    config, model, optimizer, scheduler, scaler = _setup(["TRAIN.OPTIMIZER.IMPL", "fused"])
    stepper = OptimizerStep(config, optimizer, scheduler, scaler)
    assert stepper.skips_on_device
    state = TrainState()

    def no_host_read(*_):
        raise AssertionError("a host read inside OptimizerStep.step")

    for i, (images, targets) in enumerate(_batches(3)):
        loss = nn.functional.cross_entropy(model(images), targets) * (float("nan") if i == 1 else 1.0)
        stepper.backward(loss)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, no_host_read)
            norm = stepper.step(model, state, i)
        assert bool(torch.isfinite(norm)) == (i != 1)
    assert state.nonfinite_total == 0  # not read yet
    stepper.settle(state)
    assert state.nonfinite_total == 1 and state.nonfinite_in_row == 0 and state.step == 3
