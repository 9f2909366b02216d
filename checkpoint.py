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

Training checkpoints of the official release load too (sections "the release's yacs config" and
"the release's training state" below): they pickle the run's yacs ``CfgNode`` whole, and that one
class is let through, built as a plain dict and handed on as YAML text like ours. Any other class
is refused.

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
import zipfile
from typing import Any

import numpy as np
import torch
import yaml

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
    found = re.search(r"GLOBAL ([\w.]+)", msg)
    if found and found.group(1) == _CFGNODE:  # only where this torch cannot map the class
        return UserError(
            f"cannot load {path}: reading the yacs config pickled in official checkpoints needs torch 2.6 or newer; "
            "upgrade torch (pip install -U torch)"
        )
    what = f" ({found.group(1)})" if found else ""
    return UserError(
        f"refusing to load {path}: it holds pickled Python objects{what}, not only weights and a yacs config; "
        "re-save it from a trusted environment as a plain state_dict (or .safetensors)"
    )


# ----------------------------------------------------------------------------- the release's yacs config

# The official release's save_checkpoint pickles its config, a yacs CfgNode, whole. Weights-only
# loading refuses it: CfgNode is a class, and a dict subclass the unpickler cannot fill. Rather than
# allow the real class (whose code would then run on load), exactly this one global name is allowed
# and bound to a stand-in that builds an empty OrderedDict, which the unpickler fills with plain
# items and attributes like any state_dict. Every other global is still refused before anything runs.
_CFGNODE = "yacs.config.CfgNode"


class _CfgNodeAsDict:
    """What ``yacs.config.CfgNode`` unpickles to: a plain, empty OrderedDict; arguments are ignored."""

    def __new__(cls, *args: Any, **kwargs: Any) -> collections.OrderedDict:  # type: ignore[misc]
        return collections.OrderedDict()


def _yacs_config_allowed() -> contextlib.AbstractContextManager:
    """Allow ``yacs.config.CfgNode`` (as :class:`_CfgNodeAsDict`) for one load; needs torch 2.6+.

    Older torch has no (object, name) form of safe globals: the load then refuses the class, and
    :func:`_refusal` asks for a newer torch.
    """
    # Major and minor only: builds such as 2.6.0a0+git... have the feature too.
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals([(_CfgNodeAsDict, _CFGNODE)])


_YAML_LEAVES = (int, float, bool, str, type(None))


def _plain(obj: Any) -> Any:
    """A config tree as plain dicts, lists and scalars; TypeError for anything else."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("config keys must be strings")
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if type(obj) in _YAML_LEAVES:
        return obj
    raise TypeError(f"config value of type {type(obj).__name__}")


def _config_as_yaml(checkpoint: dict, path: str) -> None:
    """Turn a config stored as a mapping (the release's CfgNode, rebuilt as dicts) into the YAML
    text our checkpoints store, in place; one that is no plain tree is left as it is."""
    config = checkpoint.get("config")
    if not isinstance(config, dict):
        return
    try:
        checkpoint["config"] = yaml.safe_dump(_plain(config), sort_keys=False)
    except (TypeError, yaml.YAMLError) as e:
        logger.debug("config of %s not converted to YAML: %s", path, e)


def _torch_load(path: str, map_location: Any, mmap: bool) -> Any:
    try:
        with _yacs_config_allowed():
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

    ``.pth``/``.pt``/other: ``torch.load(path, map_location, weights_only=True)``, with the one
    class of the official release's checkpoints allowed: their pickled yacs config, which comes
    back as YAML text under 'config', as in ours. ``.safetensors``: ``{'model': tensors}``. A sharded
    folder (``--fsdp``): its full weights, config and class names, gathered on the CPU.
    Raises UserError when the file is missing, truncated or unreadable, or holds any other
    pickled Python object (refused before anything runs).
    """
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if os.path.isdir(path):
        from sharded_checkpoint import is_sharded_checkpoint, read_as_checkpoint

        if is_sharded_checkpoint(path):
            return read_as_checkpoint(path)  # an --fsdp run's folder, its shards gathered here
        raise UserError(f"checkpoint {path} is a folder; pass the checkpoint file inside it")
    if path.endswith(".safetensors"):
        return {"model": _load_safetensors(path, map_location), **_safetensors_metadata(path)}
    obj = _torch_load(path, map_location, mmap=False)
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights; save a state_dict instead"
        )
    _config_as_yaml(obj, path)
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
    # Only torch.save's zip format (its default since torch 1.6) can be mapped; a legacy file is read.
    obj = _torch_load(path, "cpu", mmap=zipfile.is_zipfile(path))
    if not isinstance(obj, dict) or "model" not in obj:
        raise UserError(f"checkpoint {path} has no 'model' entry; it is not a training checkpoint")
    return obj


def find_resume_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in ``output_dir`` that loads, or None.

    Considers ``ckpt_step.pth``, ``last.pth`` and ``ckpt_epoch_*.pth``, and the sharded folders
    of ``--fsdp`` runs (``ckpt_epoch_*.dcp``, ``ckpt_step_*.dcp``); orders them by the (epoch,
    step) stored inside (a copied or touched file keeps its true age), on ties preferring
    last.pth, then epoch files, then step files. Files that fail to load (truncated, corrupt,
    holding pickled objects) and incomplete folders are skipped with a warning naming them.
    """
    from sharded_checkpoint import sharded_candidates

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
    for key, path in sharded_candidates(output_dir):
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


# ----------------------------------------------------------------------------- the release's training state

# What defines a timm schedule; compared to tell whether the release's schedule is this run's.
_SCHEDULE_KEYS = (
    "t_in_epochs",
    "t_initial",
    "warmup_t",
    "warmup_prefix",
    "warmup_lr_init",
    "lr_min",
    "base_values",
    "decay_t",
    "decay_rate",
    "gamma",
)


def is_official_training_checkpoint(checkpoint: dict) -> bool:
    """A training checkpoint written by the official release's ``save_checkpoint`` (model,
    optimizer, lr_scheduler, scaler, epoch, max_accuracy, config), not by ours: it has an
    optimizer state but no global 'step' (ours always store one)."""
    return "optimizer" in checkpoint and "step" not in checkpoint


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))


def schedule_differences(saved: dict, ours: dict) -> list[str]:
    """How a saved timm scheduler state differs from this run's (``key saved vs ours``); [] if not."""
    out = []
    for key in _SCHEDULE_KEYS:
        if key not in saved and key not in ours:
            continue
        a, b = saved.get(key, "unset"), ours.get(key, "unset")
        if not _close(a, b):
            out.append(f"{key} {a} vs {b}")
    return out


def _optimizer_kind(group: dict) -> str:
    return "AdamW" if "betas" in group else "SGD" if "momentum" in group else "unknown"


def remap_optimizer_state(
    saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved_order: list[str]
) -> tuple[dict | None, str]:
    """The release's ``optimizer.state_dict()`` renumbered for ``optimizer``, or (None, why not).

    Optimizer states name parameters by position. The release numbers them group by group
    ([decay, no_decay], as its set_weight_decay makes them), each in ``model.named_parameters()``
    order, which is the order of its model's state_dict (``saved_order``, buffers left out here
    as they are not parameters of ``model``). Each of this optimizer's groups is matched to the
    release's group at the same place, by size, decay and kind of optimizer, and every moment
    must have its parameter's shape.
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return None, "it holds no optimizer state_dict"
    groups = saved["param_groups"]
    ours = optimizer.param_groups
    if len(groups) != len(ours):
        return None, f"it has {len(groups)} parameter groups, this run {len(ours)}"
    name_of = {id(p): n for n, p in model.named_parameters()}
    param_of = dict(model.named_parameters())
    position = {k: i for i, k in enumerate(saved_order)}
    saved_state = saved.get("state") or {}
    state: dict[int, Any] = {}
    new_groups = []
    base = 0
    for i, (theirs, mine) in enumerate(zip(groups, ours, strict=True)):
        names = [name_of.get(id(p)) for p in mine["params"]]
        if any(n is None for n in names):
            return None, "this optimizer holds parameters that are not the model's"
        missing = [n for n in names if n not in position]
        if missing:
            return None, f"its model has no {missing[0]}"
        if len(theirs.get("params", [])) != len(names):
            return None, f"group {i} holds {len(theirs.get('params', []))} tensors, this run's {len(names)}"
        if (float(theirs.get("weight_decay", 0.0)) == 0.0) != (float(mine.get("weight_decay", 0.0)) == 0.0):
            return None, f"group {i} is decayed in one and not in the other"
        if _optimizer_kind(theirs) != _optimizer_kind(mine):
            return None, f"it is an {_optimizer_kind(theirs)} state, this run uses {_optimizer_kind(mine)}"
        ours_at = {n: base + j for j, n in enumerate(names)}
        for saved_id, name in zip(theirs["params"], sorted(names, key=position.__getitem__), strict=True):
            if saved_id not in saved_state:
                continue
            entry = saved_state[saved_id]
            shape = tuple(param_of[name].shape)
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != shape:
                    return None, f"its {key} for {name} has shape {tuple(value.shape)}, the parameter {shape}"
            state[ours_at[name]] = entry
        new_groups.append({**theirs, "params": list(range(base, base + len(names)))})
        base += len(names)
    return {"state": state, "param_groups": new_groups}, ""


def restore_official_training_state(
    checkpoint: dict,
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler,
    steps_per_epoch: int,
) -> tuple[int, int, float]:
    """Continue training from the release's checkpoint; returns (epoch to start, global step, best accuracy).

    The model's weights are loaded already. Its 'epoch' is the epoch it finished, so training
    goes on at the next one, at optimizer step ``epoch * steps_per_epoch``. The optimizer state
    is renumbered to this optimizer (:func:`remap_optimizer_state`), or, where it does not fit,
    left fresh. The lr schedule is this run's, built from the config and set to that step: the
    log says whether the release's was the same. The loss scaler's state is loaded where this
    run scales losses (float16 on CUDA). Each decision is one log line.
    """
    from models.pretrained import extract_state_dict
    from optimizer import load_optimizer_state

    epoch = int(checkpoint.get("epoch", -1)) + 1
    step = epoch * int(steps_per_epoch)
    max_accuracy = float(checkpoint.get("max_accuracy", 0.0))
    logger.info(
        "%s is a training checkpoint of the official release: epoch %d done, best accuracy %.2f%%",
        path,
        epoch - 1,
        max_accuracy,
    )

    saved_order = list(extract_state_dict(checkpoint))
    remapped, why = remap_optimizer_state(checkpoint["optimizer"], model, optimizer, saved_order)
    if remapped is not None:
        keep = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        try:
            load_optimizer_state(optimizer, remapped)
        except (UserError, ValueError) as e:
            remapped, why = None, str(e)
        else:
            for group, ours in zip(optimizer.param_groups, keep, strict=True):
                for key, value in ours.items():
                    group.setdefault(key, value)  # our group names (and lr scales), which it lacks
            logger.info("optimizer: the release's state loaded (moments of %d parameters)", len(remapped["state"]))
    if remapped is None:
        logger.warning("optimizer: the release's state does not fit this run (%s): starting a fresh one", why)

    saved_schedule = checkpoint.get("lr_scheduler")
    diffs = (
        schedule_differences(saved_schedule, lr_scheduler.state_dict())
        if isinstance(saved_schedule, dict)
        else ["no state saved"]
    )
    lr_scheduler.step_update(step)
    lr = optimizer.param_groups[0]["lr"]
    if diffs:
        logger.info(
            "lr schedule: rebuilt from this run's config at step %d (lr %.3e); the release's differs: %s",
            step,
            lr,
            "; ".join(diffs[:3]),
        )
    else:
        logger.info("lr schedule: the release's equals this run's, carried over at step %d (lr %.3e)", step, lr)

    saved_scaler = checkpoint.get("scaler") or {}
    if not scaler.is_enabled():
        logger.info("loss scaler: not used by this run (no float16 on CUDA); the release's state is not needed")
    elif not saved_scaler:
        logger.info("loss scaler: the release saved none; starting at scale %g", scaler.get_scale())
    else:
        try:
            scaler.load_state_dict(saved_scaler)
            logger.info("loss scaler: the release's state loaded (scale %g)", scaler.get_scale())
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            logger.warning(
                "loss scaler: the release's state is unusable (%s): starting at scale %g", e, scaler.get_scale()
            )
    return epoch, step, max_accuracy


def _saved_global_batch(trainer: dict) -> int:
    """Images per batch over all ranks of the run that wrote ``trainer`` (0: not recorded)."""
    return int((trainer.get("sampler") or {}).get("global_batch") or 0)


def resume_position(trainer: dict, global_batch: int) -> tuple[int, int]:
    """(epoch, batch_in_epoch) to continue at, in this run's batches of ``global_batch`` images
    (0: in the checkpoint's own batches).

    A step checkpoint of another world size or batch counted its position in its own batches
    (the sampler's positions are global): the position is converted through the number of images
    consumed in the epoch. When that is no whole number of this run's batches, training continues
    at the batch that holds the next image (those before it in the batch are seen twice).
    """
    batch = int((trainer.get("sampler") or {}).get("batch_in_epoch", 0))
    if not batch:
        return int(trainer["epoch"]) + 1, 0
    saved_global = _saved_global_batch(trainer)
    if not (saved_global and global_batch) or saved_global == global_batch:
        return int(trainer["epoch"]), batch
    return int(trainer["epoch"]), batch * saved_global // global_batch


def restore_trainer_state(
    trainer: dict, state: Any, lr_scheduler: Any, scaler: torch.amp.GradScaler, env: Any, global_batch: int
) -> None:
    """Everything but the weights and the optimizer, from a checkpoint of this project (a file's
    dict or a sharded folder's trainer state) into ``state`` (an ``engine.TrainState``) and the
    scheduler and scaler: epoch and position in it (converted to this run's ``global_batch`` =
    per-rank batch x ranks, with a warning when it differs), optimizer step, best accuracy, the
    skipped-step counts, and this rank's RNG state when the world size is the checkpoint's."""
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    if trainer.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(trainer["scaler"])
    state.max_accuracy = float(trainer.get("max_accuracy", 0.0))
    state.step = int(trainer.get("step", 0))
    state.nonfinite_in_row = int(trainer.get("nonfinite_in_row", 0))
    state.nonfinite_total = int(trainer.get("nonfinite_total", 0))
    state.epoch, state.batch_in_epoch = resume_position(trainer, global_batch)
    saved_global = _saved_global_batch(trainer)
    if saved_global and global_batch and saved_global != global_batch:
        logger.warning(
            "the checkpoint was trained with %d images per optimizer step, this run takes %d: its learning-rate "
            "schedule is kept; keep per-rank batch x ranks equal to continue exactly",
            saved_global,
            global_batch,
        )
    restore_rank_rng(trainer.get("rng"), env.rank, env.world_size, env.device)
    logger.info("resuming at epoch %d, batch %d (optimizer step %d)", state.epoch, state.batch_in_epoch, state.step)


def restore_rank_rng(rng: Any, rank: int, world_size: int, device: torch.device | None = None) -> None:
    """Restore this rank's entry of a checkpoint's per-rank RNG states (``capture_rng_state`` of
    every rank). Saved by another number of ranks: a warning, and the streams restart from the
    seed (augmentation is seeded per sample, so images stay the same; dropout and drop path draw anew)."""
    if isinstance(rng, list) and len(rng) == world_size:
        restore_rng_state(rng[rank], device)
    elif isinstance(rng, list):
        logger.warning(
            "RNG states of %d ranks not restored in a world of %d: random streams restart from the seed",
            len(rng),
            world_size,
        )
