"""Checkpoints: atomic writes, safe (weights-only) loading, rotation and resume discovery.

A checkpoint is a dict::

    model         state_dict of the (unwrapped) model
    optimizer     optimizer.state_dict()
    lr_scheduler  scheduler.state_dict()
    scaler        GradScaler.state_dict() ({} when the scaler is disabled)
    epoch         int
    step          int, global optimizer step
    max_accuracy  float
    config        YAML text of the run's config (config_yaml(config))
    sampler       optional {'epoch': int, 'start_index': int} for mid-epoch resume
    rng           optional capture_rng_state()
    class_names   optional list of str

Only tensors, numbers, strings, None and lists/tuples/dicts of them are stored, so every file
loads with ``torch.load(..., weights_only=True)``: loading never executes code from the file.

Files in the output folder: ``ckpt_epoch_{N}.pth`` (the ``keep`` newest are kept),
``last.pth`` and ``best.pth`` (never pruned), ``ckpt_step.pth`` (mid-epoch resume point).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

import distributed
from errors import UserError

logger = logging.getLogger("swin.checkpoint")

LAST_NAME = "last.pth"
BEST_NAME = "best.pth"
STEP_NAME = "ckpt_step.pth"
_EPOCH_RE = re.compile(r"^ckpt_epoch_(\d+)\.pth$")

# Types torch's weights-only unpickler rebuilds without running foreign code. Exact types
# (not isinstance): numpy.float64 subclasses float but is pickled as a numpy object.
_SAFE_LEAVES = (int, float, bool, str, bytes, type(None), complex, torch.dtype, torch.device, torch.Size)
_SAFE_DICTS = (dict, collections.OrderedDict)
_SAFE_TENSORS = (torch.Tensor, torch.nn.Parameter)


# ----------------------------------------------------------------------------- writing


def config_yaml(config: Any) -> str:
    """The YAML text stored under 'config' (a yacs CfgNode's ``dump()``; text passes through)."""
    return config if isinstance(config, str) else config.dump()


def _check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first entry that weights-only loading would refuse.

    Checked at save time so a bad entry fails the run now, not the resume days later.
    """
    t = type(obj)
    if t in _SAFE_LEAVES or t in _SAFE_TENSORS:
        return
    if t in _SAFE_DICTS:
        for k, v in obj.items():
            if type(k) not in _SAFE_LEAVES:
                raise TypeError(f"checkpoint key {k!r} in {where} has type {type(k).__name__}; use str or int keys")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint entry {where} has type {t.__module__}.{t.__qualname__}; only tensors, numbers, strings, "
        "None and lists/tuples/dicts of them load with weights_only=True"
    )


def _umask() -> int:
    """The process umask, read without changing it (os.umask(x) would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_dir(directory: str) -> None:
    """Persist a rename: the directory entry lives in the directory, not in the file."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows cannot open folders; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (network mounts) do not support fsync on folders
    finally:
        os.close(fd)


def _temp_path(directory: str, final_name: str) -> tuple[int, str]:
    # Same folder as the target: os.replace is atomic only within one file system.
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    # mkstemp creates 0600; give the file the permissions a plain open() would have.
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    The data goes to a temporary file in the same folder, is flushed and fsync'ed, then
    renamed over ``path`` (os.replace) and the folder is fsync'ed. A crash at any point leaves
    either the previous file or the complete new one under ``path``, never a truncated one;
    on error the temporary file is removed and the exception propagates.
    Raises TypeError when ``state`` holds something weights-only loading would refuse.
    """
    _check_weights_only_safe(state)
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _temp_path(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` hold the same bytes as ``src``, atomically replacing any old ``dst``.

    A hard link costs no space or time; where links are unsupported the bytes are copied.
    Either way the new name appears by os.replace, so ``dst`` is never partial. Checkpoints
    are only ever replaced, never rewritten in place, so sharing an inode is safe.
    """
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = _temp_path(directory, os.path.basename(dst))
    try:
        try:
            os.close(fd)
            os.unlink(tmp)  # os.link refuses an existing target; the unique name stays ours
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=16 * 2**20)
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _epoch_files(output_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of every ``ckpt_epoch_N.pth`` in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _EPOCH_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def prune_epoch_checkpoints(output_dir: str, keep: int, protect: str | None = None) -> list[str]:
    """Delete ``ckpt_epoch_*.pth`` beyond the ``keep`` highest epochs; ``keep`` 0 keeps all.

    ``protect`` (the file just written) is never deleted, nor are best/last (other names).
    Returns the deleted paths.
    """
    if keep < 0:
        raise UserError(f"SAVE_KEEP must be 0 (keep all) or a positive count, not {keep}")
    if keep == 0:
        return []
    files = [p for _, p in _epoch_files(output_dir)]
    protected = os.path.abspath(protect) if protect else None
    newest = set(files[-keep:])
    deleted = []
    for p in files:
        if p in newest or os.path.abspath(p) == protected:
            continue
        try:
            os.unlink(p)
            deleted.append(p)
        except FileNotFoundError:
            pass  # another process pruned it already
    return deleted


def save_epoch_checkpoint(output_dir: str, epoch: int, state: dict, keep: int, is_best: bool) -> str:
    """Write ``ckpt_epoch_{epoch}.pth``, point ``last.pth`` (and ``best.pth`` if ``is_best``) at it.

    Then deletes epoch checkpoints beyond the ``keep`` newest (0 = keep all) and removes
    ``ckpt_step.pth``, which is older than this epoch's end by construction. Returns the path.
    Call on the main process only.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"ckpt_epoch_{int(epoch)}.pth")
    save_checkpoint(path, state)
    _link_or_copy(path, os.path.join(output_dir, LAST_NAME))
    if is_best:
        _link_or_copy(path, os.path.join(output_dir, BEST_NAME))
    for p in prune_epoch_checkpoints(output_dir, keep, protect=path):
        logger.info("removed old checkpoint %s", p)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(output_dir, STEP_NAME))
    return path


def save_step_checkpoint(output_dir: str, state: dict) -> str:
    """Write the mid-epoch resume point ``ckpt_step.pth`` atomically; returns its path."""
    path = os.path.join(output_dir, STEP_NAME)
    save_checkpoint(path, state)
    return path


# ----------------------------------------------------------------------------- reading


def _unreadable(path: str) -> UserError:
    """A file torch cannot read as a checkpoint, said in the user's terms."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    what = "is empty" if empty else "is truncated, or is not a PyTorch checkpoint"
    return UserError(
        f"cannot read checkpoint {path}: the file {what}; pass a complete checkpoint "
        "(a .pth written by torch.save, or a .safetensors file), or copy or download it again"
    )


def _refusal(path: str, err: pickle.UnpicklingError) -> UserError:
    msg = str(err)
    # The weights-only unpickler reports bytes that are no (supported) pickle at all as these;
    # every other refusal is about a global, class or object it will not build.
    if re.search(r"Unsupported operand|String is too long|persistent", msg) and "GLOBAL" not in msg:
        return _unreadable(path)
    return UserError(
        f"refusing to load {path}: it holds pickled Python objects, not only weights; "
        "re-save it from a trusted environment as a plain state_dict (or .safetensors)"
    )


def _torch_load(path: str, map_location: Any, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # Truncated zip archives raise RuntimeError ("failed finding central directory"), empty
        # files EOFError, text files KeyError or "[Errno 22]": none of that means anything to the
        # user, so it goes to the debug log and the message says what the file is.
        logger.debug("torch.load(%s) failed: %r", path, e)
        raise _unreadable(path) from None


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> dict:
    """Load a checkpoint without executing any code from it.

    ``.pth``/``.pt``/other: ``torch.load(path, map_location, weights_only=True)``.
    ``.safetensors``: ``{'model': tensors}``. Raises UserError when the file is missing,
    truncated or unreadable, or holds pickled Python objects (refused before anything runs).
    """
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; pass the checkpoint file inside it")
    if path.endswith(".safetensors"):
        return {"model": _load_safetensors(path, map_location), **_safetensors_metadata(path)}
    obj = _torch_load(path, map_location, mmap=False)
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights; save a state_dict instead"
        )
    return obj


def _load_safetensors(path: str, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot read safetensors file {path} ({reason}); re-create or re-download it") from None


def _safetensors_metadata(path: str) -> dict:
    """'config' (YAML text) and 'class_names' stored by scripts/export.py, when present."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    out: dict = {}
    if "config" in meta:
        out["config"] = meta["config"]
    if "class_names" in meta:
        out["class_names"] = json.loads(meta["class_names"])
    return out


def _peek(path: str) -> dict:
    """Load for inspection: memory-mapped, so tensors are not read into RAM."""
    try:
        obj = _torch_load(path, "cpu", mmap=True)
    except UserError as e:
        if "mmap" not in str(e):
            raise
        obj = _torch_load(path, "cpu", mmap=False)  # legacy (non-zip) format cannot be mapped
    if not isinstance(obj, dict) or "model" not in obj:
        raise UserError(f"checkpoint {path} has no 'model' entry; it is not a training checkpoint")
    return obj


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in ``output_dir`` that loads, or None.

    Considers ``ckpt_step.pth``, ``last.pth`` and ``ckpt_epoch_*.pth``; orders them by the
    (epoch, step) stored inside (a copied or touched file keeps its true age), on ties
    preferring last.pth, then epoch files, then the step file. Files that fail to load
    (truncated, corrupt, holding pickled objects) are skipped with a warning naming them.
    """
    if not os.path.isdir(output_dir):
        return None
    candidates: list[tuple[str, int]] = []
    for name, prio in ((STEP_NAME, 0), (LAST_NAME, 2)):
        p = os.path.join(output_dir, name)
        if os.path.isfile(p):
            candidates.append((p, prio))
    candidates += [(p, 1) for _, p in _epoch_files(output_dir)]

    best: tuple[tuple[int, int, int], str] | None = None
    for path, prio in candidates:
        try:
            ckpt = _peek(path)
            key = (int(ckpt.get("epoch", -1)), int(ckpt.get("step", -1)), prio)
        except (UserError, TypeError, ValueError) as e:
            logger.warning("skipping checkpoint %s: %s", path, e)
            continue
        finally:
            ckpt = None  # drop the memory map before opening the next file
        if best is None or key > best[0]:
            best = (key, path)
    return best[1] if best else None


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state(device: torch.device | None = None) -> dict:
    """Python, NumPy, torch CPU and (on a CUDA ``device``) that device's RNG states, in a
    weights-only-safe form.

    NumPy's state array becomes a list of ints and Python's state tuple plain lists, since
    weights-only loading refuses numpy arrays.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "numpy": {
            "kind": str(kind),
            "keys": [int(x) for x in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": distributed.get_cuda_rng_states(device),
    }


def restore_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; entries that are missing are left alone.

    A CUDA state goes to this rank's ``device`` (a warning when it cannot be matched to it).
    """
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    if "numpy" in state:
        s = state["numpy"]
        keys = np.asarray(s["keys"], dtype=np.uint32)
        np.random.set_state((s["kind"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))
    if "torch" in state:
        # set_rng_state wants a CPU uint8 tensor; map_location may have moved it.
        torch.set_rng_state(state["torch"].detach().cpu().to(torch.uint8))
    cuda_states = state.get("cuda") or []
    if cuda_states and not distributed.set_cuda_rng_states(cuda_states, device):
        logger.warning(
            "CUDA RNG state (%d saved) not restored on device %s: the run now uses another device layout",
            len(cuda_states),
            device,
        )
