"""Index samplers: a resumable training sampler and an exact (no padding) evaluation sampler.

Both take a dataset length rather than a dataset, so they can be used and tested without data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from errors import UserError

from .sample_seeds import sample_seed

logger = logging.getLogger(__name__)


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")


class ResumableSampler(Sampler[int]):
    """Distributed training sampler that can start an epoch part-way through.

    The order matches ``torch.utils.data.DistributedSampler``: a permutation of
    ``range(dataset_len)`` drawn from ``torch.Generator().manual_seed(seed + epoch)`` (or the
    identity when ``shuffle`` is False), padded by repeating its head up to a multiple of
    ``num_replicas`` (or truncated when ``drop_last``), then rank ``r`` takes every
    ``num_replicas``-th index starting at ``r``. Each rank therefore gets ``num_samples``
    indices per epoch.

    ``set_start_index(k)`` skips the first ``k`` of this rank's indices for one iteration, so a
    run resumed after ``b`` batches of size ``B`` continues with exactly batch ``b`` when
    ``k = b * B``. The skip applies to the next iteration: calling ``set_epoch`` before that
    iteration starts keeps it (so the skip can be armed before the trainer's per-epoch
    ``set_epoch`` call); once an iteration has started, the skip is cleared by the end of
    that iteration or by the next ``set_epoch``. ``len()`` is the number of indices the next
    (or current) iteration yields, i.e. ``num_samples - k`` while a skip is armed.

    With ``sample_seeds=True`` each item is ``(index, augmentation_seed)`` instead of ``index``:
    the seed is ``sample_seed(seed, epoch, p)`` for the sample's global position ``p`` in the
    epoch (``p = i * num_replicas + rank`` for the ``i``-th index of this rank), so it is the
    same whether the sample is reached from the epoch's start or after a skip.
    ``RobustImageDataset`` runs the transform of such an item under that seed.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sample_seeds: bool = False,
    ) -> None:
        _check_rank(num_replicas, rank)
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.sample_seeds = sample_seeds
        self.epoch = 0
        # Same arithmetic as DistributedSampler, so resumed runs see the same batches.
        if drop_last and dataset_len % num_replicas != 0:
            self.num_samples = math.ceil((dataset_len - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self._start_index = 0
        # True once an iteration has begun with the current skip armed.
        self._skip_in_use = False

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``; clears a skip that an iteration already used."""
        self.epoch = epoch
        if self._skip_in_use:
            self._start_index = 0
            self._skip_in_use = False

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` indices of this rank's order in the next iteration."""
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        if start_index > self.num_samples:
            raise UserError(
                f"cannot resume at sample {start_index} of an epoch that has {self.num_samples} samples "
                f"per process; resume with the batch size and process count the checkpoint was written with"
            )
        self._start_index = start_index
        self._skip_in_use = False

    @property
    def start_index(self) -> int:
        """The skip that applies to the next (or current) iteration."""
        return self._start_index

    def epoch_indices(self) -> list[int]:
        """This rank's full index order for the current epoch, ignoring any skip."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            if padding > 0 and indices:
                # Repeat the head as often as needed (DistributedSampler's rule, also for tiny sets).
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        start = self._start_index
        self._skip_in_use = True
        indices = self.epoch_indices()[start:]
        if self.sample_seeds:
            for i, index in enumerate(indices, start):
                yield index, sample_seed(self.seed, self.epoch, i * self.num_replicas + self.rank)
        else:
            yield from indices
        # A full pass consumed the skip; a later set_start_index (during the pass) is kept.
        if self._skip_in_use and self._start_index == start:
            self._start_index = 0
            self._skip_in_use = False

    def __len__(self) -> int:
        return self.num_samples - self._start_index


# The epoch slot of evaluation seeds: one no training epoch uses.
EVAL_EPOCH = (1 << 63) - 1


class ExactEvalSampler(Sampler[int]):
    """Evaluation sampler that visits every index exactly once across all ranks.

    Rank ``r`` gets ``range(r, dataset_len, num_replicas)``: no padding and no duplicates, so
    summed metrics are exact. Shares differ in size by at most one (a rank may get none when
    ``dataset_len < num_replicas``). With ``sample_seeds_from`` each item is
    ``(index, seed)``, the seed a function of ``sample_seeds_from`` and the index only.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, sample_seeds_from: int | None = None) -> None:
        _check_rank(num_replicas, rank)
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.sample_seeds_from = sample_seeds_from

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        indices = range(self.rank, self.dataset_len, self.num_replicas)
        if self.sample_seeds_from is None:
            return iter(indices)
        # Random but fixed evaluation (SimMIM's masks): the seed depends on the image alone, so any
        # world size and every epoch score the same draws.
        return ((i, sample_seed(self.sample_seeds_from, EVAL_EPOCH, i)) for i in indices)

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))
