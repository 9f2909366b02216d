"""The loops: ``train_one_epoch``, ``evaluate`` and ``throughput``.

``main.py`` wires the pieces together; everything a loop needs arrives as an argument.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from timm.utils import AverageMeter, accuracy

from config import is_pretraining, model_section
from distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    autocast_context,
    max_memory_mb,
    reset_peak_memory,
    resolve_amp_dtype,
)
from errors import UserError
from fsdp import forwards_to_pad, global_grad_norm, no_grad_sync, pad_forwards
from timing import time_images_per_second

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


def model_inputs(samples: torch.Tensor | list | tuple, device: torch.device) -> list[torch.Tensor]:
    """The model's positional inputs on ``device``: ``[images]``, or SimMIM's ``[images, masks]``."""
    parts = samples if isinstance(samples, (list, tuple)) else [samples]
    return [p.to(device, non_blocking=True) for p in parts]


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
) -> dict[str, float]:
    """One pass over ``loader`` (from ``state.batch_in_epoch`` on when resuming mid-epoch).

    Gradients accumulate over ``TRAIN.ACCUMULATION_STEPS`` batches; the learning rate is updated
    every optimizer step. A non-finite gradient norm (fp32/bf16) skips the update; too many in a
    row stop the run. ``criterion`` None: the model returns its own loss (SimMIM pre-training,
    whose batches are ``(images, masks)``). Returns the epoch's averages.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    accum = config.TRAIN.ACCUMULATION_STEPS
    epoch = state.epoch
    start_batch = state.batch_in_epoch
    num_steps = start_batch + len(loader)
    loss_meter, norm_meter, time_meter = AverageMeter(), AverageMeter(), AverageMeter()
    scaler_meter = AverageMeter()
    corrupt_this_epoch = 0
    reset_peak_memory(env.device)
    start = end = time.time()
    for idx, batch in enumerate(loader, start=start_batch):
        samples, targets, replaced = batch
        for path in replaced:
            if path:
                corrupt_this_epoch += 1
                if path not in state.corrupt_seen:
                    state.corrupt_seen.add(path)
                    logger.warning("unreadable image replaced by another sample: %s", path)
        inputs = model_inputs(samples, env.device)
        targets = targets.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            inputs[0], targets = mixup_fn(inputs[0], targets)

        is_update = (idx + 1) % accum == 0
        sync_ctx = no_grad_sync(model) if (env.distributed and not is_update) else _null()
        with sync_ctx:
            with autocast_context(env.device, config.AMP_ENABLE, config.AMP_DTYPE):
                outputs = model(*inputs)
                loss = outputs if criterion is None else criterion(outputs, targets)
            scaler.scale(loss / accum).backward()

        if is_update:
            scaler.unscale_(optimizer)
            grad_norm = _grad_norm(model.parameters(), config.TRAIN.CLIP_GRAD)
            finite = bool(torch.isfinite(grad_norm))
            if finite or scaler.is_enabled():
                # With fp16 the scaler itself skips an inf/nan step and lowers the scale.
                scaler.step(optimizer)
                scaler.update()
                state.nonfinite_in_row = 0 if finite else state.nonfinite_in_row
            if not finite and not scaler.is_enabled():
                state.nonfinite_in_row += 1
                state.nonfinite_total += 1
                logger.warning(
                    "non-finite loss/gradient at epoch %d step %d: update skipped (%d in a row)",
                    epoch,
                    idx,
                    state.nonfinite_in_row,
                )
                if state.nonfinite_in_row >= config.TRAIN.MAX_NONFINITE_STEPS:
                    raise UserError(
                        f"{state.nonfinite_in_row} non-finite losses in a row at epoch {epoch}; stopping, the last "
                        f"good checkpoint is kept in {config.OUTPUT}; lower TRAIN.BASE_LR or enable TRAIN.CLIP_GRAD"
                    )
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            lr_scheduler.step_update(state.step)
            if finite:
                norm_meter.update(float(grad_norm))
            scaler_meter.update(float(scaler.get_scale()) if scaler.is_enabled() else 1.0)
        state.batch_in_epoch = idx + 1

        loss_meter.update(loss.item(), targets.size(0))
        time_meter.update(time.time() - end)
        end = time.time()

        if is_update:
            periodic = bool(hooks.step_save_freq) and state.step % hooks.step_save_freq == 0
            if periodic:
                hooks.save_step_checkpoint()
            if hooks.stop_requested():
                if not periodic:  # the periodic save above already wrote this step; don't write it twice
                    hooks.save_step_checkpoint()
                raise StopTraining(f"stopped at epoch {epoch}, batch {idx + 1}/{num_steps}")

        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            _log_step(
                config,
                optimizer,
                epoch,
                idx,
                num_steps,
                loss_meter,
                norm_meter,
                scaler_meter,
                time_meter,
                targets.size(0) * env.world_size,
                env,
            )
            if writer is not None:
                writer.add_scalar("train/loss", loss_meter.val, state.step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.step)
                writer.add_scalar("train/grad_norm", norm_meter.val, state.step)
                writer.add_scalar(
                    "train/images_per_s", targets.size(0) * env.world_size / max(time_meter.val, 1e-9), state.step
                )

    corrupt_total = int(all_reduce_sum(torch.tensor([float(corrupt_this_epoch)], device=env.device)).item())
    if corrupt_total:
        logger.warning("epoch %d: %d unreadable images were replaced", epoch, corrupt_total)
    if writer is not None:
        writer.add_scalar("train/corrupt_images", corrupt_total, epoch)
        writer.add_scalar("train/nonfinite_steps", state.nonfinite_total, epoch)
    epoch_time = time.time() - start
    logger.info("EPOCH %d training takes %s", epoch, datetime.timedelta(seconds=int(epoch_time)))
    state.batch_in_epoch = 0
    return {"loss": loss_meter.avg, "grad_norm": norm_meter.avg, "corrupt_images": corrupt_total, "seconds": epoch_time}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _log_step(
    config, optimizer, epoch, idx, num_steps, loss_meter, norm_meter, scaler_meter, time_meter, global_batch, env
):
    lr = optimizer.param_groups[0]["lr"]
    wd = max(g["weight_decay"] for g in optimizer.param_groups)
    eta = time_meter.avg * (num_steps - idx - 1)
    # The whole run at this epoch's pace (evaluation time not included).
    run_eta = eta + time_meter.avg * num_steps * max(0, config.TRAIN.EPOCHS - epoch - 1)
    logger.info(
        f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
        f"eta {datetime.timedelta(seconds=int(eta))} (run {datetime.timedelta(seconds=int(run_eta))}) "
        f"lr {lr:.6f}\t wd {wd:.4f}\t"
        f"time {time_meter.val:.4f} ({time_meter.avg:.4f})\t"
        f"loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t"
        f"grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t"
        f"loss_scale {scaler_meter.val:.1f}\t"
        f"img/s {global_batch / max(time_meter.val, 1e-9):.1f}\t"
        f"mem {max_memory_mb(env.device):.0f}MB"
    )


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

    `` * Acc@1 A Acc@5 B loss L images N``, and when files were excluded
    `` of T, K unreadable: p1, p2, p3 (+M more)`` after it, paths relative to ``data_root``.
    """
    line = (
        f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.4f} images {result['count']}"
    )
    unreadable = result.get("unreadable") or []
    if unreadable:
        named = ", ".join(_short_path(p, data_root) for p in unreadable[:EVAL_NAMED_UNREADABLE])
        more = len(unreadable) - EVAL_NAMED_UNREADABLE
        line += f" of {result['total']}, {len(unreadable)} unreadable: {named}"
        if more > 0:
            line += f" (+{more} more)"
    return line


@torch.no_grad()
def evaluate(config, loader, model: nn.Module, env: DistEnv) -> dict[str, Any]:
    """Top-1, top-5 and loss over the readable validation images, each counted exactly once.

    A row whose ``replaced`` path is set comes from a file that could not be read: it is
    excluded from the metrics (whatever image the loader put there, a placeholder or, from a
    substituting loader, another sample) and named. Sums (not per-rank means) are reduced across
    ranks and the excluded paths gathered, so N ranks report what one process would.

    Returns ``acc1``, ``acc5``, ``loss`` (over the scored images), ``count`` (images scored),
    ``total`` (images in the set: scored + unreadable) and ``unreadable`` (sorted paths). A set
    with no readable image is a ``UserError``; ``DATA.STRICT`` already failed in the loader.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # correct@1, correct@5, loss, scored, unreadable
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)
    unreadable: list[str] = []
    # A sharded model gathers its weights in every forward: all ranks must run as many.
    padding = forwards_to_pad(model, env, len(loader))
    end = time.time()
    for idx, (images, target, replaced) in enumerate(loader):
        images = images.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)
        with autocast_context(env.device, config.AMP_ENABLE, config.AMP_DTYPE):
            output = model(images)
        output = output.float()
        bad = [p for p in replaced if p]
        if bad:
            # The whole batch ran (fixed shapes); only the readable rows are scored.
            unreadable.extend(bad)
            keep = torch.tensor([not p for p in replaced], dtype=torch.bool, device=output.device)
            output, target = output[keep], target[keep]
        n = target.size(0)
        if n:
            k = min(5, output.size(1))
            acc1, acc5 = accuracy(output, target, topk=(1, k))
            correct1, correct5 = round(acc1.item() * n / 100), round(acc5.item() * n / 100)
            loss_sum = criterion(output, target).item()
        else:
            correct1 = correct5 = 0
            loss_sum = 0.0
        sums += torch.tensor(
            [correct1, correct5, loss_sum, n, len(bad)],
            dtype=torch.float64,
            device=env.device,
        )
        if idx % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx}/{len(loader)}]\ttime {time.time() - end:.3f}")
        end = time.time()
    pad_forwards(model, config, env, padding)
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
def evaluate_reconstruction(config, loader, model: nn.Module, env: DistEnv) -> dict[str, Any]:
    """SimMIM's validation: the mean reconstruction loss over the readable images.

    Batches are ``((images, masks), _, replaced)`` with masks fixed per image (seeded by the
    eval sampler), so the figure is comparable between epochs and runs. Every image has the same
    number of masked pixels, so the per-image mean is the batch loss weighted by batch size;
    sums are reduced across ranks. Returns ``loss``, ``count``, ``total`` and ``unreadable``.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss · n, scored, unreadable
    unreadable: list[str] = []
    padding = forwards_to_pad(model, env, len(loader))  # sharded: all ranks run as many forwards
    for (images, masks), _, replaced in loader:
        keep = torch.tensor([not p for p in replaced], dtype=torch.bool)
        unreadable.extend(p for p in replaced if p)
        n = int(keep.sum())
        if n:
            images, masks = model_inputs((images[keep], masks[keep]), env.device)
            with autocast_context(env.device, config.AMP_ENABLE, config.AMP_DTYPE):
                loss = model(images, masks)
            sums += torch.tensor([float(loss) * n, n, 0], dtype=torch.float64, device=env.device)
        else:
            pad_forwards(model, config, env, 1)  # no readable image: a stand-in keeps sharded ranks in step
        sums[2] += len(replaced) - n
    pad_forwards(model, config, env, padding)
    sums = all_reduce_sum(sums)
    count, n_unreadable = int(sums[1].item()), int(sums[2].item())
    if n_unreadable:
        unreadable = sorted(p for paths in all_gather_object(unreadable) for p in paths)
    if count == 0:
        raise UserError("the validation set yielded no readable image; check the val/ folder of DATA.DATA_PATH")
    result = {"loss": sums[0].item() / count, "count": count, "total": count + n_unreadable, "unreadable": unreadable}
    line = f" * reconstruction loss {result['loss']:.4f} images {count}"
    if unreadable:
        line += f" of {result['total']}, {n_unreadable} unreadable: " + ", ".join(unreadable[:EVAL_NAMED_UNREADABLE])
        logger.warning(line)
    else:
        logger.info(line)
    return result


@torch.no_grad()
def throughput(config, model: nn.Module, env: DistEnv, batch_size: int | None = None, iters: int = 10) -> float:
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
    amp = resolve_amp_dtype(env.device, config.AMP_DTYPE) if config.AMP_ENABLE else None
    dtype = "float32" if amp is None else str(amp).replace("torch.", "") + " autocast"

    def step():
        with autocast_context(env.device, config.AMP_ENABLE, config.AMP_DTYPE):
            model(*inputs)

    timing = time_images_per_second(
        step, batch_size, env.device, warmup=3 if env.device.type == "cpu" else 50, iters=iters
    )
    logger.info(
        f"throughput: {timing.images_per_s:.1f} images/s (batch {batch_size}, {size}x{size}, {dtype}, "
        f"device {env.device}, {timing.iters} timed iterations)"
    )
    return timing.images_per_s


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds)))) if math.isfinite(seconds) else "?"
