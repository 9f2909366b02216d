"""Sharded checkpoints (``torch.distributed.checkpoint``, DCP) for ``--fsdp`` runs.

Every rank writes its own shards in parallel, so no rank ever holds the whole model, and the
layout does not depend on the number of ranks: a checkpoint of N ranks resumes on M (M = 1
included, in a 1-rank group or no group at all), each rank reading the pieces of its new shards.

A checkpoint is a folder in the run's output folder::

    ckpt_epoch_{N}.dcp/      end of epoch N (the SAVE_KEEP newest are kept)
    ckpt_step_{S}.dcp/       mid-epoch, after optimizer step S (STEP_SAVE_FREQ or SIGTERM);
                             the previous one is removed once this one is complete
    best.dcp/                a copy (hard links) of the best epoch's folder
      __{rank}_0.distcp      rank's shards of the model and of the optimizer moments (DCP)
      .metadata              DCP's index: which file holds which piece of which tensor
      trainer_state.pth      rank 0: epoch, step, best accuracy, config YAML, sampler position,
                             every rank's RNG state, lr schedule, loss scaler, the optimizer's
                             parameter groups (names, lr, decay); weights-only like every .pth
      COMPLETE.json          written last: format, epoch, step, world size, every file's size

Only tensors go through DCP ("model": the model's state_dict, "optim": the optimizer's
per-parameter state by parameter name); everything else sits in ``trainer_state.pth``, which
loads with ``weights_only=True``. DCP's ``.metadata`` is a pickle: it is read with an unpickler
that builds only DCP's own metadata classes and refuses any other (see :class:`_MetadataReader`).

Atomic: the ranks write into ``.NAME.tmp/``; once all are done rank 0 writes the trainer state,
then ``COMPLETE.json``, and renames the folder to its name. A crash leaves either no folder of
that name or a complete one; a folder without a valid ``COMPLETE.json`` (copied half-way, files
missing or truncated) is skipped by auto-resume with a warning.

``scripts/export.py`` turns a folder into one ``{'model': state_dict}`` file in a single process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

import distributed
from errors import UserError

logger = logging.getLogger("swin.checkpoint")

SUFFIX = ".dcp"
MARKER = "COMPLETE.json"
TRAINER_STATE = "trainer_state.pth"
FORMAT = "swin-dcp-1"
BEST_NAME = "best" + SUFFIX
_EPOCH_RE = re.compile(r"^ckpt_epoch_(\d+)\.dcp$")
_STEP_RE = re.compile(r"^ckpt_step_(\d+)\.dcp$")


def epoch_name(epoch: int) -> str:
    return f"ckpt_epoch_{int(epoch)}{SUFFIX}"


def step_name(step: int) -> str:
    return f"ckpt_step_{int(step)}{SUFFIX}"


def is_sharded_checkpoint(path: str) -> bool:
    """True for a folder written by :func:`save_sharded` (complete or not) or any DCP folder."""
    if not os.path.isdir(path):
        return False
    return path.rstrip(os.sep).endswith(SUFFIX) or any(
        os.path.exists(os.path.join(path, n)) for n in (MARKER, ".metadata")
    )


# ----------------------------------------------------------------------------- completeness


def check_complete(path: str) -> dict:
    """The folder's ``COMPLETE.json`` after checking that every file it lists is there at its
    size; UserError naming what is wrong otherwise."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"sharded checkpoint {path} is incomplete: it has no {MARKER} (its save did not finish)"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"sharded checkpoint {path} is incomplete: {MARKER} is unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("files"), dict):
        raise UserError(f"sharded checkpoint {path}: {MARKER} is not of format {FORMAT}")
    for name, size in info["files"].items():
        p = os.path.join(path, name)
        try:
            actual = os.path.getsize(p)
        except OSError:
            raise UserError(f"sharded checkpoint {path} is incomplete: {name} is missing") from None
        if actual != size:
            raise UserError(f"sharded checkpoint {path} is incomplete: {name} has {actual} bytes of {size}")
    return info


def sharded_candidates(output_dir: str) -> list[tuple[tuple[int, int, int], str]]:
    """((epoch, step, priority), path) of every complete sharded checkpoint in ``output_dir``.

    Priority orders equal (epoch, step): an epoch folder (1) over a step folder (0), as for
    ``.pth`` files. ``best.dcp`` is a copy of an epoch folder and is left out. Incomplete folders
    are skipped with a warning naming them.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        prio = 1 if _EPOCH_RE.match(name) else 0 if _STEP_RE.match(name) else None
        path = os.path.join(output_dir, name)
        if prio is None or not os.path.isdir(path):
            continue
        try:
            info = check_complete(path)
            found.append(((int(info["epoch"]), int(info["step"]), prio), path))
        except (UserError, KeyError, TypeError, ValueError) as e:
            logger.warning("skipping checkpoint %s: %s", path, e)
    return found


# ----------------------------------------------------------------------------- the metadata pickle

# What DCP's .metadata pickle may name: its own metadata classes, torch's dtypes and sizes, and
# the few helpers torch pickles them with. Anything else is refused before it is built.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)  # plain dataclasses
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where a piece lies in a file
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),  # the checkpoint id (the folder it was written to)
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name}")


def _metadata_reader(path: str):
    """A ``FileSystemReader`` for ``path`` whose metadata is unpickled by :class:`_SafeUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _MetadataReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            file = os.path.join(str(self.path), ".metadata")
            try:
                with open(file, "rb") as f:
                    metadata = _SafeUnpickler(f).load()
            except pickle.UnpicklingError as e:
                raise UserError(
                    f"refusing to load {path}: its .metadata names {e}, which no checkpoint index holds"
                ) from None
            except (OSError, EOFError, ValueError) as e:
                raise UserError(f"cannot read {file} ({e}); the checkpoint is damaged") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _MetadataReader(path)


def tensor_shapes(path: str, prefix: str = "model.") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name (without ``prefix``) -> (global shape, dtype) of every tensor under ``prefix`` in the
    checkpoint's index; reads no tensor data."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _metadata_reader(path).read_metadata()
    return {
        key[len(prefix) :]: (tuple(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


# ----------------------------------------------------------------------------- writing


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_marker(folder: str, info: dict) -> None:
    files = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p) and name != MARKER:
            files[name] = os.path.getsize(p)
    marker = os.path.join(folder, MARKER)
    with open(marker, "w") as f:
        json.dump({"format": FORMAT, **info, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """What DCP reads and writes: ``{"model": state_dict, "optim": {"state": {name: moments}}}``
    (sharded tensors for a sharded model), and the optimizer's full state dict (names for
    parameters), whose param_groups travel in the trainer state instead."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    osd = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        state["optim"] = {"state": osd["state"]}
    return state, osd


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns each time it saves or loads without a process group; here that is intended
    (export, a plain single-process resume)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    distributed.barrier()


def save_sharded(
    output_dir: str, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict
) -> str:
    """Write ``output_dir/name`` atomically from every rank (a collective call); returns its path.

    ``model``: the unwrapped (sharded) model. ``trainer_state``: everything but the weights and
    the optimizer moments (rank 0's copy is written; it must load with ``weights_only=True``).
    An existing folder of that name is replaced once the new one is complete.
    """
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    from checkpoint import _fsync_dir, save_checkpoint

    rank = distributed.get_rank()
    final = os.path.join(os.path.abspath(output_dir), name)
    tmp = os.path.join(os.path.dirname(final), f".{name}.tmp")
    if rank == 0:
        # Saves of a run follow one another: any temporary folder left now is of a save that crashed.
        for stale in os.listdir(os.path.dirname(final)):
            if stale.startswith(".") and stale.endswith((SUFFIX + ".tmp", SUFFIX + ".old")):
                shutil.rmtree(os.path.join(os.path.dirname(final), stale), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    tensors, osd = _tensor_state(model, optimizer)
    with _single_process_quietly():
        dcp_save(tensors, storage_writer=FileSystemWriter(tmp, sync_files=True))
    _barrier()
    if rank == 0:
        groups = [dict(g) for g in osd["param_groups"]] if osd is not None else []
        extra = {
            **trainer_state,
            "optimizer_groups": groups,
            "world_size": distributed.get_world_size(),
            "format": FORMAT,
        }
        save_checkpoint(os.path.join(tmp, TRAINER_STATE), extra)
        _write_marker(
            tmp,
            {
                "epoch": int(trainer_state.get("epoch", -1)),
                "step": int(trainer_state.get("step", -1)),
                "world_size": distributed.get_world_size(),
            },
        )
        for f in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, f))
        _fsync_dir(tmp)
        _replace_folder(tmp, final)
    _barrier()
    return final


def _replace_folder(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed after.

    A folder cannot be renamed over a non-empty one: between the two renames ``dst`` is briefly
    absent (the other checkpoints of the run remain), never half-written.
    """
    from checkpoint import _fsync_dir

    parent = os.path.dirname(dst)
    old = None
    if os.path.exists(dst):
        old = os.path.join(parent, f".{os.path.basename(dst)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _link_copy_folder(src: str, dst: str) -> None:
    """``dst`` becomes a copy of folder ``src`` (hard links where possible), replaced atomically."""
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(src):
        try:
            os.link(os.path.join(src, name), os.path.join(tmp, name))
        except OSError:
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    _replace_folder(tmp, dst)


def _remove(paths: list[str]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
        logger.info("removed old checkpoint %s", p)


def _numbered(output_dir: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(output_dir):
        m = pattern.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(out)


def save_epoch_sharded(
    output_dir: str,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int,
    is_best: bool,
) -> str:
    """``ckpt_epoch_{epoch}.dcp`` (collective); then, on rank 0, ``best.dcp`` if ``is_best``, the
    epoch folders beyond the ``keep`` newest (0 keeps all) and every step folder are removed."""
    if keep < 0:
        raise UserError(f"SAVE_KEEP must be 0 (keep all) or a positive count, not {keep}")
    path = save_sharded(output_dir, epoch_name(epoch), model, optimizer, trainer_state)
    if distributed.get_rank() == 0:
        if is_best:
            _link_copy_folder(path, os.path.join(output_dir, BEST_NAME))
        epochs = [p for _, p in _numbered(output_dir, _EPOCH_RE)]
        old = [p for p in (epochs[:-keep] if keep else []) if p != path]
        _remove(old + [p for _, p in _numbered(output_dir, _STEP_RE)])
    _barrier()
    return path


def save_step_sharded(output_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict) -> str:
    """``ckpt_step_{step}.dcp`` (collective); the older step folders are removed once it is complete."""
    path = save_sharded(output_dir, step_name(trainer_state["step"]), model, optimizer, trainer_state)
    if distributed.get_rank() == 0:
        _remove([p for _, p in _numbered(output_dir, _STEP_RE) if p != path])
    _barrier()
    return path


# ----------------------------------------------------------------------------- reading


def read_trainer_state(path: str) -> dict:
    """The folder's ``trainer_state.pth`` (weights-only), after checking the folder is complete."""
    from checkpoint import load_checkpoint_file

    check_complete(path)
    return load_checkpoint_file(os.path.join(path, TRAINER_STATE))


def check_architecture(path: str, model: nn.Module) -> None:
    """UserError naming the parameters whose names or shapes differ between checkpoint and model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    saved = tensor_shapes(path)
    ours = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}
    problems = []
    for key in sorted(set(saved) | set(ours)):
        if key not in saved:
            problems.append(f"{key}: missing in the checkpoint")
        elif key not in ours:
            problems.append(f"{key}: not in this model")
        elif saved[key][0] != ours[key]:
            problems.append(f"{key}: checkpoint {saved[key][0]} vs model {ours[key]}")
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit this architecture ({len(problems)} mismatched): "
            f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}; check --cfg"
        )


def load_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load ``path`` into ``model`` (and ``optimizer``) on every rank (a collective call under a
    process group); returns the trainer state.

    ``model``: unwrapped, sharded over any number of ranks or not sharded at all. Its
    parameters must match the checkpoint's by name and shape (UserError naming those that do
    not); the optimizer's groups must be the checkpoint's (UserError, as for ``.pth`` files).
    """
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from optimizer import _IMPL_FLAGS, _check_same_groups

    trainer = read_trainer_state(path)
    check_architecture(path, model)
    tensors, osd = _tensor_state(model, optimizer)
    if optimizer is not None:
        saved_groups = trainer.get("optimizer_groups") or []
        _check_same_groups(osd["param_groups"], saved_groups)
    with _single_process_quietly():
        dcp_load(tensors, storage_reader=_metadata_reader(path))
    set_model_state_dict(model, tensors["model"])
    if optimizer is not None:
        flags = {k: optimizer.defaults[k] for k in _IMPL_FLAGS if k in optimizer.defaults}
        set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"]["state"], "param_groups": saved_groups})
        for group in optimizer.param_groups:
            group.update(flags)  # this run's foreach/fused choice, not the saving run's
    return trainer


def load_full_model_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(full model state_dict, trainer state) of a sharded checkpoint, read in this process alone.

    Needs no process group and no model: the tensors are allocated from the checkpoint's index
    and filled from every rank's files. For ``scripts/export.py`` and inspection; the whole model
    must fit in this process's memory.
    """
    from torch.distributed.checkpoint import load as dcp_load

    trainer = read_trainer_state(path)
    state = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in tensor_shapes(path).items()}
    with _single_process_quietly():
        dcp_load({"model": state}, storage_reader=_metadata_reader(path), no_dist=True)
    return state, trainer


def resume_sharded(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: Any,
    env: distributed.DistEnv,
    model_only: bool,
    global_batch: int,
) -> dict:
    """Continue training from a sharded checkpoint (``--resume`` or auto-resume), as
    ``main.load_resume`` does from a file; ``model_only`` loads just the weights (``--eval``).

    ``state`` (an ``engine.TrainState``) gets the epoch, step, position in the epoch (converted
    to this run's ``global_batch`` = per-rank batch x ranks) and best accuracy; every rank's RNG
    state is restored when the world size is the checkpoint's. Returns the trainer state.
    """
    from checkpoint import restore_trainer_state

    trainer = load_sharded(path, model, None if model_only else optimizer)
    logger.info("resumed weights from %s (saved by %d ranks)", path, int(trainer.get("world_size", 0)))
    if model_only:
        return trainer
    restore_trainer_state(trainer, state, lr_scheduler, scaler, env, global_batch)
    return trainer


def read_as_checkpoint(path: str) -> dict:
    """A sharded folder as the dict a checkpoint file holds, gathered in this process: 'model'
    (full tensors on the CPU) with 'config', 'class_names', 'epoch', 'step' and 'max_accuracy'.
    No optimizer: ``main.py`` resumes a folder as it is. For ``checkpoint.load_checkpoint_file``,
    hence ``--pretrained``, ``scripts/export.py``, ``predict.py`` and ``explain.py``."""
    state, trainer = load_full_model_state_dict(path)
    keep = ("config", "class_names", "epoch", "step", "max_accuracy")
    return {"model": state, **{k: trainer[k] for k in keep if k in trainer}}
