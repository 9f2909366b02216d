"""The loops: ``train_one_epoch``, ``evaluate`` and ``throughput``.

``main.py`` wires the pieces together; everything a loop needs arrives as an argument.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.utils import AverageMeter

from config import is_pretraining, model_section
from data.robust import UNREADABLE_TARGET, clear_unreadable, unreadable_names
from data.uint8_batches import Uint8Batch
from distributed import (
    DistEnv,
    Precision,
    all_gather_object,
    all_reduce_sum,
    max_memory_mb,
    reset_peak_memory,
)
from errors import UserError
from fsdp import forwards_to_pad, global_grad_norm, no_grad_sync, pad_forwards
from models.compile import FirstBatchSizeCompiled, run_eagerly
from timing import SETTLE_PASSES, time_images_per_second

logger = logging.getLogger("swin")


@dataclass
class TrainState:
    """Progress that a checkpoint must carry to resume exactly."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken since the start of training
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed (mid-epoch resume)
    max_accuracy: float = 0.0
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    corrupt_seen: set[str] = field(default_factory=set)


@dataclass
class StepHooks:
    """Callbacks the epoch loop raises at optimizer-step boundaries."""

    save_step_checkpoint: Callable[[], None]
    stop_requested: Callable[[], bool]
    step_save_freq: int = 0


class StopTraining(Exception):
    """Raised inside the loop after a pre-emption checkpoint is written."""


def _grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip to ``max_norm`` when set (> 0); always return the global L2 norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    # Over FSDP's gradient shards clip_grad_norm_ reduces the norm across ranks itself.
    return global_grad_norm(torch.nn.utils.clip_grad_norm_(params, limit))


def model_inputs(samples: torch.Tensor | Uint8Batch | list | tuple, device: torch.device) -> list[torch.Tensor]:
    """The model's positional inputs on ``device``: ``[images]``, or SimMIM's ``[images, masks]``.

    A ``Uint8Batch`` (the fast pipeline's batches) is normalised and erased on ``device`` by its
    own ``to``."""
    parts = samples if isinstance(samples, (list, tuple)) else [samples]
    return [p.to(device, non_blocking=True) for p in parts]


class OptimizerStep:
    """The update that ends an accumulation window, apart from the loop that feeds it.

    ``backward(loss)`` adds one micro-batch's gradients (scaled for fp16, divided by
    ``TRAIN.ACCUMULATION_STEPS``); ``step(model, state)`` unscales, clips to ``TRAIN.CLIP_GRAD``
    and measures the global gradient norm, steps (or, for a non-finite norm under fp32/bf16,
    skips the step; fp16's scaler skips by itself), zeroes the gradients and advances the
    per-step schedule. Nothing is read back to the host: a fused optimizer is told to skip on its
    device (``found_inf``, torch's GradScaler protocol), and the finite flags wait until
    ``settle(state)``, which the loop calls where it reads anyway (log lines, checkpoints, the
    epoch's end) to count the skipped steps and stop the run after ``TRAIN.MAX_NONFINITE_STEPS``
    in a row. Other optimizers read the flag before stepping (one host read per step).
    """

    def __init__(self, config, optimizer: torch.optim.Optimizer, lr_scheduler, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.accum = int(config.TRAIN.ACCUMULATION_STEPS)
        self.clip = config.TRAIN.CLIP_GRAD
        self.max_nonfinite = int(config.TRAIN.MAX_NONFINITE_STEPS)
        self.output = config.OUTPUT
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._unread: list[tuple[int, int, torch.Tensor]] = []  # (epoch, batch, finite) not yet read

    def is_update(self, batch_index: int) -> bool:
        """Whether the batch at ``batch_index`` (counted in the epoch) ends an accumulation window."""
        return (batch_index + 1) % self.accum == 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accum).backward()

    def step(self, model: nn.Module, state: TrainState, batch_index: int) -> torch.Tensor:
        """One optimizer step after batch ``batch_index``; returns the gradient norm before
        clipping, on its device (inf or nan when the step was skipped)."""
        scaler = self.scaler
        scaler.unscale_(self.optimizer)
        grad_norm = _grad_norm(model.parameters(), self.clip)
        if scaler.is_enabled():
            # With fp16 the scaler itself skips an inf/nan step and lowers the scale.
            scaler.step(self.optimizer)
            scaler.update()
        else:
            finite = torch.isfinite(grad_norm)
            if self.skips_on_device:
                _step_unless(self.optimizer, ~finite)
            elif bool(finite):
                self.optimizer.step()
            self._unread.append((state.epoch, batch_index, finite))
        self.zero_grad()
        state.step += 1
        self.lr_scheduler.step_update(state.step)
        return grad_norm

    def settle(self, state: TrainState) -> None:
        """Read the finite flags of the steps since the last call (one host read) into ``state``:
        a finite step ends a run of skipped ones; each skipped one is counted and logged, and the
        ``TRAIN.MAX_NONFINITE_STEPS``-th in a row stops training."""
        if not self._unread:
            return
        flags = torch.stack([finite for _, _, finite in self._unread]).tolist()
        steps = [(epoch, batch) for epoch, batch, _ in self._unread]
        self._unread.clear()
        for (epoch, batch_index), finite in zip(steps, flags, strict=True):
            if finite:
                state.nonfinite_in_row = 0
            else:
                self._skip(state, epoch, batch_index)

    def _skip(self, state: TrainState, epoch: int, batch_index: int) -> None:
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        logger.warning(
            "non-finite loss/gradient at epoch %d step %d: update skipped (%d in a row)",
            epoch,
            batch_index,
            state.nonfinite_in_row,
        )
        if state.nonfinite_in_row >= self.max_nonfinite:
            raise UserError(
                f"{state.nonfinite_in_row} non-finite losses in a row at epoch {state.epoch}; stopping, the last "
                f"good checkpoint is kept in {self.output}; lower TRAIN.BASE_LR or enable TRAIN.CLIP_GRAD"
            )

    def loss_scale(self) -> torch.Tensor:
        """The fp16 loss scale (1 without a scaler), left on its device: ``get_scale()`` would
        wait for the step just queued, once per step; the meter reads it at log time."""
        if not self.scaler.is_enabled():
            return torch.ones(())
        return self.scaler._get_scale_async()


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-dim bool tensor ``skip`` is true, decided on its device:
    a fused optimizer reads ``found_inf`` as it does under torch's GradScaler (no loss scale here)."""
    optimizer.grad_scale, optimizer.found_inf = None, skip.to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


class DeviceMean:
    """A running mean of scalar tensors that stays on their device until read.

    ``update`` adds without a host sync (``loss.item()`` every step would stall a GPU each
    micro-batch); ``val`` and ``avg`` sync when the log line is written. ``finite_only``: values
    that are inf or nan (the gradient norm of a skipped step) are left out of the mean, and
    ``val`` is the last finite one.
    """

    def __init__(self, finite_only: bool = False) -> None:
        self.finite_only = finite_only
        self._last: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count: torch.Tensor | int = 0

    def update(self, value: torch.Tensor, n: int = 1) -> None:
        value = value.detach().float()
        weight: torch.Tensor | int = n  # a plain count unless values may be left out
        last = value
        if self.finite_only:
            finite = torch.isfinite(value)
            weight = finite.float() * n
            value = torch.where(finite, value, torch.zeros_like(value))
            last = torch.where(finite, last, value if self._last is None else self._last)
        first = self._sum is None
        self._last = last
        self._sum = value * n if first else self._sum + value * n
        self._count = weight if first else self._count + weight

    @property
    def val(self) -> float:
        return float(self._last) if self._last is not None else 0.0

    @property
    def avg(self) -> float:
        if self._sum is None:
            return 0.0
        count = self._count.clamp(min=1) if isinstance(self._count, torch.Tensor) else self._count
        return float(self._sum / count)


@dataclass
class TrainMeters:
    """Running values of one epoch, logged every ``PRINT_FREQ`` batches."""

    loss: DeviceMean = field(default_factory=DeviceMean)
    grad_norm: DeviceMean = field(default_factory=lambda: DeviceMean(finite_only=True))
    loss_scale: DeviceMean = field(default_factory=DeviceMean)
    time: AverageMeter = field(default_factory=AverageMeter)  # a whole step, data included
    data: AverageMeter = field(default_factory=AverageMeter)  # waiting for the loader's batch

    def data_share(self) -> float:
        """Percentage of the step time spent waiting for data (the loader is the bottleneck when high)."""
        return 100.0 * self.data.avg / max(self.time.avg, 1e-9)

    def log(self, config, optimizer, epoch: int, idx: int, num_steps: int, global_batch: int, env: DistEnv) -> None:
        lr = optimizer.param_groups[0]["lr"]
        wd = max(g["weight_decay"] for g in optimizer.param_groups)
        eta = self.time.avg * (num_steps - idx - 1)
        # The whole run at this epoch's pace (evaluation time not included).
        run_eta = eta + self.time.avg * num_steps * max(0, config.TRAIN.EPOCHS - epoch - 1)
        logger.info(
            f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
            f"eta {datetime.timedelta(seconds=int(eta))} (run {datetime.timedelta(seconds=int(run_eta))}) "
            f"lr {lr:.6f}\t wd {wd:.4f}\t"
            f"time {self.time.val:.4f} ({self.time.avg:.4f})\t"
            f"data {self.data.val:.4f} ({self.data.avg:.4f}, {self.data_share():.0f}%)\t"
            f"loss {self.loss.val:.4f} ({self.loss.avg:.4f})\t"
            f"grad_norm {self.grad_norm.val:.4f} ({self.grad_norm.avg:.4f})\t"
            f"loss_scale {self.loss_scale.val:.1f}\t"
            f"img/s {global_batch / max(self.time.val, 1e-9):.1f}\t"
            f"mem {max_memory_mb(env.device):.0f}MB"
        )

    def write(self, writer, optimizer, step: int, global_batch: int) -> None:
        writer.add_scalar("train/loss", self.loss.val, step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        writer.add_scalar("train/grad_norm", self.grad_norm.val, step)
        writer.add_scalar("train/images_per_s", global_batch / max(self.time.val, 1e-9), step)
        writer.add_scalar("train/data_time", self.data.val, step)
        writer.add_scalar("train/data_share_percent", self.data_share(), step)


def _note_replaced(dataset, state: TrainState) -> int:
    """The epoch's substituted samples, counted from the dataset's log; each unreadable file is
    named once per run."""
    names = unreadable_names(dataset)
    for path in names:
        if path not in state.corrupt_seen:
            state.corrupt_seen.add(path)
            logger.warning("unreadable image replaced by another sample: %s", path)
    return len(names)


def train_one_epoch(
    config,
    model: nn.Module,
    criterion: nn.Module | None,
    loader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    scaler: torch.amp.GradScaler,
    mixup_fn,
    env: DistEnv,
    state: TrainState,
    hooks: StepHooks,
    writer=None,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (from ``state.batch_in_epoch`` on when resuming mid-epoch).

    Gradients accumulate over ``TRAIN.ACCUMULATION_STEPS`` batches and each window ends in an
    :class:`OptimizerStep`. ``criterion`` None: the model returns its own loss (SimMIM
    pre-training, whose batches are ``(images, masks)``). ``precision``: the run's, decided once
    by the caller (default: from AMP_ENABLE / AMP_DTYPE). Returns the epoch's averages.
    """
    precision = precision or Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)
    model.train()
    stepper = OptimizerStep(config, optimizer, lr_scheduler, scaler)
    stepper.zero_grad()
    meters = TrainMeters()
    num_steps = state.batch_in_epoch + len(loader)
    reset_peak_memory(env.device)
    dataset = getattr(loader, "dataset", None)  # any iterable of batches will do; a DataLoader has one
    clear_unreadable(dataset)  # the dataset marks unreadable samples; counted after the epoch
    start = end = time.time()
    for idx, (samples, targets) in enumerate(loader, start=state.batch_in_epoch):
        meters.data.update(time.time() - end)
        inputs = model_inputs(samples, env.device)
        targets = targets.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            inputs[0], targets = mixup_fn(inputs[0], targets)

        is_update = stepper.is_update(idx)
        with no_grad_sync(model) if (env.distributed and not is_update) else contextlib.nullcontext():
            with precision.autocast():
                outputs = model(*inputs)
                loss = outputs if criterion is None else criterion(outputs, targets)
            stepper.backward(loss)
        if is_update:
            meters.grad_norm.update(stepper.step(model, state, idx))
            meters.loss_scale.update(stepper.loss_scale())
        state.batch_in_epoch = idx + 1
        meters.loss.update(loss, targets.size(0))
        meters.time.update(time.time() - end)
        end = time.time()

        if is_update:
            periodic = bool(hooks.step_save_freq) and state.step % hooks.step_save_freq == 0
            if periodic:
                stepper.settle(state)  # the checkpoint carries the skipped-step counts
                hooks.save_step_checkpoint()
            if hooks.stop_requested():
                if not periodic:  # the periodic save above already wrote this step; don't write it twice
                    stepper.settle(state)
                    hooks.save_step_checkpoint()
                raise StopTraining(f"stopped at epoch {state.epoch}, batch {idx + 1}/{num_steps}")
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            stepper.settle(state)
            global_batch = targets.size(0) * env.world_size
            meters.log(config, optimizer, state.epoch, idx, num_steps, global_batch, env)
            if writer is not None:
                meters.write(writer, optimizer, state.step, global_batch)

    stepper.settle(state)
    replaced_count = _note_replaced(dataset, state)
    corrupt_total = int(all_reduce_sum(torch.tensor([float(replaced_count)], device=env.device)).item())
    if corrupt_total:
        logger.warning("epoch %d: %d unreadable images were replaced", state.epoch, corrupt_total)
    if writer is not None:
        writer.add_scalar("train/corrupt_images", corrupt_total, state.epoch)
        writer.add_scalar("train/nonfinite_steps", state.nonfinite_total, state.epoch)
    epoch_time = time.time() - start
    logger.info("EPOCH %d training takes %s", state.epoch, datetime.timedelta(seconds=int(epoch_time)))
    state.batch_in_epoch = 0
    return {
        "loss": meters.loss.avg,
        "grad_norm": meters.grad_norm.avg,
        "corrupt_images": corrupt_total,
        "seconds": epoch_time,
        "data_seconds": meters.data.avg,
        "data_share_percent": meters.data_share(),
    }


# How many unreadable files the evaluation summary line names; the rest are counted.
EVAL_NAMED_UNREADABLE = 3


def _short_path(path: str, root: str) -> str:
    """``path`` relative to the data folder ``root`` when it lies inside it (shorter log lines)."""
    if root:
        rel = os.path.relpath(path, root)
        if rel.split(os.sep)[0] != os.pardir:
            return rel
    return path


def eval_summary(result: dict[str, Any], data_root: str = "") -> str:
    """The line that ends an evaluation, as scripts and tests parse it.

    `` * Acc@1 A Acc@5 B loss L images N`` (SimMIM: `` * reconstruction loss L images N``), and
    when files were excluded `` of T, K unreadable: p1, p2, p3 (+M more)`` after it, paths
    relative to ``data_root``.
    """
    if "acc1" in result:
        line = f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.4f}"
    else:
        line = f" * reconstruction loss {result['loss']:.4f}"
    line += f" images {result['count']}"
    unreadable = result.get("unreadable") or []
    if unreadable:
        named = ", ".join(_short_path(p, data_root) for p in unreadable[:EVAL_NAMED_UNREADABLE])
        more = len(unreadable) - EVAL_NAMED_UNREADABLE
        line += f" of {result['total']}, {len(unreadable)} unreadable: {named}"
        if more > 0:
            line += f" (+{more} more)"
    return line


def correct_in_top(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """How many rows have their target among the top-k logits, for each k (as device tensors).

    Args:
        output: (n, classes) logits. target: (n,) class indices.
    """
    top = output.topk(max(ks), dim=1).indices  # n, max k
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(config, loader, model: nn.Module, env: DistEnv, precision: Precision | None = None) -> dict[str, Any]:
    """Top-1, top-5 and loss over the readable validation images, each counted exactly once.

    A row with target -1 (``UNREADABLE_TARGET``) is the placeholder of a file that could not be
    read (validation sets are built without substitution): it is left out of every sum on the
    device, and the dataset's log names it after the pass. Sums (not per-rank means) are reduced
    across ranks and the names gathered, so N ranks report what one process would.

    Returns ``acc1``, ``acc5``, ``loss`` (over the scored images), ``count`` (images scored),
    ``total`` (images in the set: scored + unreadable) and ``unreadable`` (sorted paths). A set
    with no readable image is a ``UserError``; ``DATA.STRICT`` already failed in the loader.
    """
    precision = precision or Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum", ignore_index=UNREADABLE_TARGET)
    # correct@1, correct@5, loss, scored, unreadable
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)
    # A sharded model gathers its weights in every forward: all ranks must run as many.
    padding = forwards_to_pad(model, env, len(loader))
    dataset = getattr(loader, "dataset", None)
    clear_unreadable(dataset)
    compiled_for = FirstBatchSizeCompiled()  # a compiled model's smaller last batch runs eagerly
    end = time.time()
    for idx, (images, target) in enumerate(loader):
        (images,) = model_inputs(images, env.device)
        target = target.to(env.device, non_blocking=True)
        with precision.autocast(), compiled_for(len(images)):
            output = model(images)
        output = output.float()
        # Summed on the device (a placeholder's -1 matches no class and is ignored by the loss):
        # reading anything here would stall a GPU once per batch.
        correct1, correct5 = correct_in_top(output, target, (1, min(5, output.size(1))))
        loss = criterion(output, target)
        scored = (target != UNREADABLE_TARGET).sum()
        sums[:4] += torch.stack([correct1.double(), correct5.double(), loss.double(), scored.double()])
        if idx % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx}/{len(loader)}]\ttime {time.time() - end:.3f}")
        end = time.time()
    pad_forwards(model, config, env, padding)
    unreadable = unreadable_names(dataset)
    sums[4] += len(unreadable)
    sums = all_reduce_sum(sums)
    count, n_unreadable = int(sums[3].item()), int(sums[4].item())
    if n_unreadable:
        # Every rank sees the same sum, so all of them take part in the gather or none does.
        unreadable = sorted(p for paths in all_gather_object(unreadable) for p in paths)
    total = count + n_unreadable
    if count == 0:
        if n_unreadable:
            raise UserError(
                f"none of the {total} validation images could be read "
                f"(e.g. {', '.join(unreadable[:EVAL_NAMED_UNREADABLE])}); check DATA.DATA_PATH/val"
            )
        raise UserError("the validation set yielded no images; check DATA.DATA_PATH/val")
    result: dict[str, Any] = {
        "acc1": 100.0 * sums[0].item() / count,
        "acc5": 100.0 * sums[1].item() / count,
        "loss": sums[2].item() / count,
        "count": count,
        "total": total,
        "unreadable": unreadable,
    }
    line = eval_summary(result, str(config.DATA.DATA_PATH))
    if unreadable:
        # A warning, not info: the metrics cover fewer images than the folder holds.
        logger.warning(line)
    else:
        logger.info(line)
    return result


@torch.no_grad()
def evaluate_reconstruction(
    config, loader, model: nn.Module, env: DistEnv, precision: Precision | None = None
) -> dict[str, Any]:
    """SimMIM's validation: the mean reconstruction loss over the readable images.

    Batches are ``((images, masks), target)`` (target -1: an unreadable image's placeholder, left
    out) with masks fixed per image (seeded by the
    eval sampler), so the figure is comparable between epochs and runs. Every image has the same
    number of masked pixels, so the per-image mean is the batch loss weighted by batch size;
    sums are reduced across ranks. Returns ``loss``, ``count``, ``total`` and ``unreadable``.
    """
    precision = precision or Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss · n, scored, unreadable
    padding = forwards_to_pad(model, env, len(loader))  # sharded: all ranks run as many forwards
    dataset = getattr(loader, "dataset", None)
    clear_unreadable(dataset)
    compiled_for = FirstBatchSizeCompiled()
    for (images, masks), target in loader:
        keep = target != UNREADABLE_TARGET  # on the host, before the batch moves: no device sync
        n = int(keep.sum())
        if n:
            images, masks = model_inputs((images[keep], masks[keep]), env.device)
            # A batch thinned by unreadable images has a one-off size: run it eagerly, and let the
            # first whole batch set the compiled size.
            with precision.autocast(), run_eagerly() if n < len(target) else compiled_for(n):
                loss = model(images, masks)
            sums[0] += loss.detach().double() * n  # on the device: no host read per batch
            sums[1] += n
        else:
            pad_forwards(model, config, env, 1)  # no readable image: a stand-in keeps sharded ranks in step
    pad_forwards(model, config, env, padding)
    unreadable = unreadable_names(dataset)
    sums[2] += len(unreadable)
    sums = all_reduce_sum(sums)
    count, n_unreadable = int(sums[1].item()), int(sums[2].item())
    if n_unreadable:
        unreadable = sorted(p for paths in all_gather_object(unreadable) for p in paths)
    if count == 0:
        raise UserError("the validation set yielded no readable image; check the val/ folder of DATA.DATA_PATH")
    result = {"loss": sums[0].item() / count, "count": count, "total": count + n_unreadable, "unreadable": unreadable}
    line = eval_summary(result, str(config.DATA.DATA_PATH))
    if unreadable:
        logger.warning(line)  # the figure covers fewer images than the folder holds
    else:
        logger.info(line)
    return result


@torch.no_grad()
def throughput(
    config,
    model: nn.Module,
    env: DistEnv,
    batch_size: int | None = None,
    iters: int = 10,
    precision: Precision | None = None,
) -> float:
    """Forward images/s on a random batch of the configured size (timed as the benchmark times)."""
    model.eval()
    size = config.DATA.IMG_SIZE
    batch_size = batch_size or config.DATA.BATCH_SIZE
    images = torch.randn(batch_size, model_section(config).IN_CHANS, size, size, device=env.device)
    inputs = [images]
    if is_pretraining(config):
        # SimMIM takes a token mask too; which tokens are masked does not change the cost.
        grid = size // model_section(config).PATCH_SIZE
        inputs.append(torch.zeros(batch_size, grid, grid, dtype=torch.long, device=env.device))
    precision = precision or Precision.decide(env.device, config.AMP_ENABLE, config.AMP_DTYPE)

    def step():
        with precision.autocast():
            model(*inputs)

    # On the CPU, a few more untimed batches until the page faults stop (timing.settle_page_faults).
    warmup = 3 if env.device.type == "cpu" else 50
    timing = time_images_per_second(step, batch_size, env.device, warmup=warmup, iters=iters, settle=SETTLE_PASSES)
    logger.info(
        f"throughput: {timing.images_per_s:.1f} images/s (batch {batch_size}, {size}x{size}, {precision.label}, "
        f"device {env.device}, {timing.iters} timed iterations after {warmup + timing.settle_passes} untimed)"
    )
    return timing.images_per_s
