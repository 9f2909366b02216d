"""Per-step learning-rate schedules built on timm's schedulers.

All schedules count optimizer steps (``t_in_epochs=False``): call
``scheduler.step_update(global_step)`` after every optimizer step, where ``global_step`` is
the number of optimizer steps taken so far. A linear warmup from ``warmup_lr`` to ``base_lr``
over ``TRAIN.WARMUP_EPOCHS`` epochs comes first. For 'cosine' and 'linear', with
``TRAIN.LR_SCHEDULER.WARMUP_PREFIX`` the decay starts after it, otherwise the decay's clock starts
at step 0; 'step' and 'multistep' count their epochs from step 0, as the official release does
(its SimMIM configs decay at epoch 700 of 800, warmup included).

Layer-wise lr decay: a param group with an ``lr_scale`` (optimizer.param_groups) gets the
schedule's lr times that scale, at every step (timm's ``Scheduler.update_groups`` applies it,
and so does :class:`LinearLRScheduler`, which updates through it).
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from errors import UserError

SCHEDULERS = ("cosine", "linear", "step", "multistep")


class _WarmupScheduler(Scheduler):
    """timm's ``Scheduler`` with the linear warmup from ``warmup_lr_init`` to the base lr over
    ``warmup_t`` steps that every schedule here starts with; subclasses give the lr after it.
    As timm's schedulers, the optimizer holds the warmup lr from construction on."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_t: int,
        warmup_lr_init: float,
        t_in_epochs: bool,
        initialize: bool,
    ) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs, initialize=initialize)
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if self.warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / self.warmup_t for v in self.base_values]
            super().update_groups(self.warmup_lr_init)
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        return self._after_warmup(t)

    def _after_warmup(self, t: int) -> list[float]:
        raise NotImplementedError


class LinearLRScheduler(_WarmupScheduler):
    """Linear warmup, then linear decay from the base lr to ``lr_min`` over ``t_initial`` steps.

    timm has no linear decay. Same contract as timm's schedulers: ``step_update(t)`` sets the
    lr of step ``t``; after the decay ends the lr stays at ``lr_min``. State is plain numbers,
    so ``state_dict()`` is checkpoint-safe.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        t_initial: int,
        lr_min: float = 0.0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        warmup_prefix: bool = True,
        t_in_epochs: bool = False,
        initialize: bool = True,
    ) -> None:
        if t_initial <= 0:
            raise ValueError(f"t_initial must be positive, got {t_initial}")
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_prefix = warmup_prefix
        super().__init__(optimizer, warmup_t, warmup_lr_init, t_in_epochs, initialize)

    def _after_warmup(self, t: int) -> list[float]:
        if self.warmup_prefix:
            t = t - self.warmup_t
        frac = min(max(t / self.t_initial, 0.0), 1.0)
        return [v - (v - self.lr_min) * frac for v in self.base_values]

    def get_cycle_length(self, cycles: int = 0) -> int:
        """Steps until the lr reaches ``lr_min`` (timm's name for the schedule length)."""
        return self.t_initial + self.warmup_t if self.warmup_prefix else self.t_initial


class MilestoneLRScheduler(_WarmupScheduler):
    """Linear warmup, then the base lr times ``gamma`` for each milestone reached: at step ``t``
    the lr is ``base x gamma ** (number of milestones <= t)``.

    The official release's multistep schedule. timm's ``MultiStepLRScheduler`` applies each
    milestone one step early (it compares ``t + 1``) and, with a warmup prefix, ``warmup_t``
    steps late. Milestones are steps counted from 0, warmup included, none inside the warmup.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: list[int],
        gamma: float = 0.1,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        t_in_epochs: bool = False,
        initialize: bool = True,
    ) -> None:
        if not milestones or sorted(milestones) != list(milestones) or milestones[0] < warmup_t:
            raise ValueError(f"milestones must be sorted and >= warmup_t ({warmup_t}), got {milestones}")
        self.milestones = list(milestones)
        self.gamma = gamma
        super().__init__(optimizer, warmup_t, warmup_lr_init, t_in_epochs, initialize)

    def _after_warmup(self, t: int) -> list[float]:
        return [v * self.gamma ** bisect.bisect_right(self.milestones, t) for v in self.base_values]


def build_scheduler(
    config: Any,
    optimizer: torch.optim.Optimizer,
    n_iter_per_epoch: int,
    base_lr: float,
    warmup_lr: float,
    min_lr: float,
) -> Scheduler:
    """The schedule named by TRAIN.LR_SCHEDULER.NAME, counting optimizer steps.

    ``n_iter_per_epoch``: optimizer steps per epoch (batches // ACCUMULATION_STEPS).
    ``base_lr``/``warmup_lr``/``min_lr``: already scaled (optimizer.scaled_lrs). Every param
    group's lr and initial_lr are set to ``base_lr`` first (the optimizer was built with the
    unscaled TRAIN.BASE_LR); after construction the optimizer holds the lr of step 0
    (``warmup_lr`` when there is a warmup), times each group's ``lr_scale`` where it has one.
    Impossible settings raise UserError.

    'cosine': cosine from base_lr to min_lr. 'linear': straight line from base_lr to min_lr.
    'step': x DECAY_RATE every DECAY_EPOCHS. 'multistep': x GAMMA at each epoch in MULTISTEPS.
    'step' and 'multistep' count epochs from the start of training, warmup included (the
    release's schedules; WARMUP_PREFIX shifts 'cosine' and 'linear' only).
    """
    sched_cfg = config.TRAIN.LR_SCHEDULER
    name = str(sched_cfg.NAME).strip().lower()
    if name not in SCHEDULERS:
        raise UserError(f"unknown TRAIN.LR_SCHEDULER.NAME {sched_cfg.NAME!r}; use one of {', '.join(SCHEDULERS)}")
    if n_iter_per_epoch < 1:
        raise UserError(
            "an epoch has no optimizer step (fewer batches than TRAIN.ACCUMULATION_STEPS); "
            "lower TRAIN.ACCUMULATION_STEPS or DATA.BATCH_SIZE, or use more data"
        )
    epochs, warmup_epochs = config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS
    if epochs < 1 or warmup_epochs < 0:
        raise UserError(f"TRAIN.EPOCHS ({epochs}) must be >= 1 and TRAIN.WARMUP_EPOCHS ({warmup_epochs}) >= 0")
    prefix = bool(sched_cfg.WARMUP_PREFIX)
    # int(): fractional warmup epochs are allowed (the official release truncates the same way).
    num_steps = int(epochs * n_iter_per_epoch)
    warmup_steps = int(warmup_epochs * n_iter_per_epoch)
    decay_steps = num_steps - warmup_steps if prefix else num_steps
    if warmup_steps >= num_steps:
        raise UserError(
            f"TRAIN.WARMUP_EPOCHS ({warmup_epochs}) must be smaller than TRAIN.EPOCHS ({epochs}); "
            "lower it, e.g. --opts TRAIN.WARMUP_EPOCHS 0"
        )

    for group in optimizer.param_groups:
        # timm reads the schedule's peak from 'initial_lr' (setdefault), so overwrite both; the
        # unscaled base lr here, the group's lr_scale is applied by the scheduler.
        group["lr"] = base_lr
        group["initial_lr"] = base_lr
    common = dict(warmup_lr_init=warmup_lr, warmup_t=warmup_steps, t_in_epochs=False)

    scheduler = _build(name, sched_cfg, optimizer, n_iter_per_epoch, decay_steps, min_lr, common, prefix)
    lr0 = scheduler._get_lr(0)
    for group, value in zip(optimizer.param_groups, lr0, strict=True):
        # Layer-wise lr decay relies on the scheduler applying 'lr_scale' (timm >= 0.9 does).
        if abs(group["lr"] - value * group.get("lr_scale", 1.0)) > 1e-12 + 1e-6 * abs(value):
            raise RuntimeError("the installed timm ignores param groups' lr_scale; upgrade timm (>= 1.0)")
    return scheduler


def _build(
    name: str,
    sched_cfg: Any,
    optimizer: torch.optim.Optimizer,
    n_iter_per_epoch: int,
    decay_steps: int,
    min_lr: float,
    common: dict,
    prefix: bool,
) -> Scheduler:
    if name == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=decay_steps, lr_min=min_lr, cycle_limit=1, warmup_prefix=prefix, **common
        )
    if name == "linear":
        return LinearLRScheduler(optimizer, t_initial=decay_steps, lr_min=min_lr, warmup_prefix=prefix, **common)
    if name == "step":
        decay_t = int(sched_cfg.DECAY_EPOCHS * n_iter_per_epoch)
        if decay_t < 1:
            raise UserError(
                f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS ({sched_cfg.DECAY_EPOCHS}) must be > 0 for the step schedule"
            )
        return StepLRScheduler(
            optimizer, decay_t=decay_t, decay_rate=sched_cfg.DECAY_RATE, warmup_prefix=False, **common
        )
    milestones = sorted(int(m * n_iter_per_epoch) for m in sched_cfg.MULTISTEPS)
    if not milestones or milestones[0] < 1:
        raise UserError(
            "TRAIN.LR_SCHEDULER.MULTISTEPS must list positive epochs for the multistep schedule, e.g. [30, 60]"
        )
    if milestones[0] < common["warmup_t"]:
        raise UserError(
            f"TRAIN.LR_SCHEDULER.MULTISTEPS {list(sched_cfg.MULTISTEPS)} has an epoch before the warmup "
            f"ends (epoch {common['warmup_t'] / n_iter_per_epoch:g}); list epochs from there on"
        )
    return MilestoneLRScheduler(optimizer, milestones=milestones, gamma=sched_cfg.GAMMA, **common)
