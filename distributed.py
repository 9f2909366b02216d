"""Devices, process groups, mixed precision and seeding: the only module that talks to CUDA.

Every other module asks this one about the device, so CPU-only machines and multi-GPU
``torchrun`` launches run the same code. Launch modes:

* ``python main.py ...``: one process, no process group, rank 0 of 1.
* ``torchrun --nproc_per_node N main.py ...``: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set,
  a process group is started (NCCL on CUDA, Gloo on CPU) and each process uses GPU ``LOCAL_RANK``.

All collective helpers are no-ops (or identities) when no process group is running, so callers
never branch on ``distributed`` themselves.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import random
import resource
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError

logger = logging.getLogger(__name__)

_DEVICE_CHOICES = ("auto", "cpu", "cuda")
_AMP_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class DistEnv:
    """Where this process runs.

    ``device`` is the one device this process computes on (``cuda:LOCAL_RANK`` under torchrun
    with CUDA). ``distributed`` is True exactly when a process group was initialised.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun or unset it"
        ) from None


def _restart_scoped_store(rank: int, world_size: int) -> dist.Store | None:
    """Under torchrun's shared agent store: that store with keys scoped to this restart attempt.

    torchrun (c10d rendezvous) lets the workers use its own TCP store, which outlives the
    workers. Without a per-attempt scope, the group restarted by ``--max-restarts`` can read
    the addresses (Gloo) or unique id (NCCL) the killed attempt left there and hang in
    ``init_process_group``. Every agent counts restarts in step, so ``TORCHELASTIC_RESTART_COUNT``
    names the same attempt on every node. Returns None outside that setting (a plain launch
    or ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), where rank 0 hosts a fresh store each attempt.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank=rank, world_size=world_size))
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return dist.PrefixStore(f"swin/attempt_{attempt}", store)


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun, join the process group.

    ``device_pref``: 'auto' (CUDA when available, else CPU), 'cpu' (force CPU) or 'cuda'
    (UserError when no CUDA device is visible). A process group is started only when both
    ``RANK`` and ``WORLD_SIZE`` are in the environment (``env://`` rendezvous); calling this
    twice reuses the group already running.
    """
    pref = str(device_pref).strip().lower()
    if pref not in _DEVICE_CHOICES:
        raise UserError(f"device must be one of {', '.join(_DEVICE_CHOICES)}, not {device_pref!r}")
    cuda_ok = torch.cuda.is_available()
    if pref == "cuda" and not cuda_ok:
        raise UserError(
            "device 'cuda' was asked for but no CUDA device is available; use --device cpu or --device auto"
        )
    use_cuda = cuda_ok and pref != "cpu"

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        # LOCAL_RANK is set by torchrun; a hand-made single-node launch may omit it.
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise UserError(
                f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not; "
                "launch with torchrun or unset RANK/WORLD_SIZE"
            )
        if use_cuda:
            n_gpu = torch.cuda.device_count()
            if local_rank >= n_gpu:
                raise UserError(
                    f"LOCAL_RANK {local_rank} has no GPU: only {n_gpu} visible; "
                    f"start at most {n_gpu} processes per node"
                )
            # Set before init so NCCL binds this process to its own GPU, not all to GPU 0.
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            kwargs: dict[str, Any] = {}
            if backend == "nccl":
                # Binding the group to the device up front lets barriers know which GPU to use.
                kwargs["device_id"] = device
            store = _restart_scoped_store(rank, world_size)
            if store is not None:
                kwargs["store"] = store
            else:
                kwargs["init_method"] = "env://"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        return DistEnv(rank, world_size, local_rank, device, True)

    if use_cuda:
        # current_device honours CUDA_VISIBLE_DEVICES and an earlier set_device.
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistEnv(0, 1, 0, device, False)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes; 1 without a process group."""
    return dist.get_world_size() if _initialized() else 1


def is_multi_process() -> bool:
    """Whether collectives have other ranks to talk to (a process group of more than one)."""
    return _initialized() and get_world_size() > 1


def barrier() -> None:
    """Wait for every rank; returns at once without a process group."""
    if not _initialized() or get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the GPU from the rank, which can hang on odd layouts.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (unchanged with one process).

    The tensor must live on the process's device (CUDA for NCCL).
    """
    if is_multi_process():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank; ``[obj]`` with one process.

    ``obj`` must be picklable; meant for small things (metrics, RNG states), not tensors.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (if any); safe to call more than once."""
    if _initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA tensors allocated on ``device``, or this process's peak RSS on CPU.

    The CPU figure is the process-lifetime peak (``ru_maxrss``) and cannot be reset.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window; no-op on CPU (the RSS peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def precision_label(device: torch.device, enabled: bool, dtype_name: str) -> tuple[str, str]:
    """The precision a run computes in and why, in words: ``(label, reason)``."""
    if not enabled:
        return "float32", "AMP_ENABLE False"
    dtype = resolve_amp_dtype(device, dtype_name)
    auto = str(dtype_name).strip().lower() == "auto"
    if dtype is None:
        return "float32", "AMP_DTYPE auto: this CPU has no native bfloat16, which would be emulated and far slower"
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    scaled = " with loss scaling" if dtype == torch.float16 and device.type == "cuda" else ""
    if not auto:
        why = f"AMP_DTYPE {dtype_name}"
    elif device.type == "cuda":
        why = f"AMP_DTYPE auto: this GPU {'has' if dtype == torch.bfloat16 else 'lacks'} native bfloat16"
    else:
        why = "AMP_DTYPE auto: this CPU has native bfloat16 (AVX-512 BF16 or AMX)"
    return f"{name} autocast{scaled}, float32 weights", why


def describe_precision(device: torch.device, enabled: bool, dtype_name: str) -> str:
    """The precision a run computes in, and why, in words for its first log lines."""
    return Precision.decide(device, enabled, dtype_name).description


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX).

    Without it oneDNN emulates bf16 matrix products at a small fraction of fp32 speed (measured
    here on an AVX2 machine: ~2 vs ~90 GFLOP/s), so bf16 autocast would only slow training down.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype for ``name``; None means "no autocast, run in float32".

    'auto' = bfloat16 on GPUs that support it (Ampere and newer: no loss scaler needed, and fp16
    runs of the release report NaN losses), float16 with the loss scaler on older GPUs; on the CPU
    bfloat16 where the CPU has native bf16 instructions,
    else None (logged once). 'bfloat16' and 'float16' are taken as given; bfloat16 on a GPU
    without support is a UserError.
    """
    key = str(name).strip().lower()
    if key == "auto":
        if device.type == "cuda":
            # Native bf16 only (Ampere and newer): torch's default also counts pre-Ampere GPUs
            # (V100, T4) that can merely hold bf16 tensors, where it is emulated and slow.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if cpu_has_fast_bf16():
            return torch.bfloat16
        _log_once("this CPU has no native bfloat16 instructions: mixed precision is off, training runs in float32")
        return None
    if key not in _AMP_DTYPES:
        raise UserError(f"AMP_DTYPE must be 'auto', 'bfloat16' or 'float16', not {name!r}")
    dtype = _AMP_DTYPES[key]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("AMP_DTYPE bfloat16 is not supported by this GPU; use --opts AMP_DTYPE float16")
    return dtype


def autocast_context(device: torch.device, enabled: bool, dtype_name: str = "auto") -> AbstractContextManager[Any]:
    """``torch.autocast`` for the device type when ``enabled``, else a do-nothing context."""
    dtype = resolve_amp_dtype(device, dtype_name) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Precision:
    """The run's mixed precision, decided once (``Precision.decide``) and handed to the loops.

    ``dtype``: the autocast dtype, None for float32; ``label``: the precision in words (e.g.
    "bfloat16 autocast, float32 weights"), ``reason`` why it was chosen (see
    :func:`precision_label`); ``description``: both, as the first log lines say them.
    """

    device: torch.device
    dtype: torch.dtype | None
    label: str
    reason: str = ""

    @classmethod
    def decide(cls, device: torch.device, enabled: bool, dtype_name: str = "auto") -> Precision:
        dtype = resolve_amp_dtype(device, dtype_name) if enabled else None
        return cls(device, dtype, *precision_label(device, enabled, dtype_name))

    @property
    def description(self) -> str:
        return f"{self.label} ({self.reason})" if self.reason else self.label

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> AbstractContextManager[Any]:
        """``torch.autocast`` in this precision, or a do-nothing context for float32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def make_grad_scaler(device: torch.device, enabled: bool, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler that is active only for float16 autocast on CUDA.

    bfloat16 has float32's exponent range and needs no scaling; fp32 needs none either. The
    disabled scaler still offers ``scale``/``unscale_``/``step``/``update``/``state_dict`` (as
    identities), so the training loop has a single code path. ``is_enabled()`` tells which.
    """
    if enabled and device.type == "cuda" and dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    # Only 'cuda' and 'cpu' are known scaler devices; a disabled one never touches the device.
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=False)


_logged: set = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch (all devices) with ``seed + rank``; returns that seed.

    Adding the rank gives each process different augmentations while staying reproducible.
    """
    s = int(seed) + int(rank)
    random.seed(s)
    # NumPy's legacy seeder only takes 0 <= seed < 2**32.
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def get_cuda_rng_states(device: torch.device | None = None) -> list[torch.Tensor]:
    """The RNG state of this rank's CUDA device, as a one-element list; empty off CUDA.

    Only the rank's own device: the other GPUs of a node belong to the other ranks. A CPU run
    never touches CUDA here (reading a state would initialise it).
    """
    if device is None or device.type != "cuda":
        return []
    return [torch.cuda.get_rng_state(device).cpu()]


def set_cuda_rng_states(states: list[torch.Tensor], device: torch.device | None = None) -> bool:
    """Restore a state saved by :func:`get_cuda_rng_states` into this rank's device.

    Older checkpoints hold one state per visible GPU: the one at this device's index is taken
    when the count matches. Returns False (and changes nothing) when nothing fits.
    """
    if not states or device is None or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if len(states) == 1:
        state = states[0]
    elif len(states) == torch.cuda.device_count():
        state = states[index]
    else:
        return False
    torch.cuda.set_rng_state(state.cpu().to(torch.uint8), device)
    return True


def configure_matmul_precision(device: torch.device, precision: str) -> None:
    """On CUDA, float32 matrix products at ``precision``: 'high' lets Ampere and newer GPUs use
    TF32 tensor cores (PyTorch's default, 'highest', runs them at full fp32 speed, several times
    slower); 'highest' keeps full fp32. Nothing changes on the CPU, where 'high' could let oneDNN
    trade precision too."""
    if precision not in _MATMUL_PRECISIONS:
        raise UserError(f"CUDA_MATMUL_PRECISION must be one of {', '.join(_MATMUL_PRECISIONS)}, not {precision!r}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision(precision)


_MATMUL_PRECISIONS = ("highest", "high", "medium")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DistributedDataParallel for this rank's device.

    ``broadcast_buffers=False``: the model's buffers (position indices, V2's coordinate tables)
    are derived from its shape, identical on every rank, so re-broadcasting them every forward
    only costs a collective; and that collective in the eval forward would hang a rank that has
    no validation batch while the others wait for it.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.14 renames the switch (the buffers are still synced once at construction, which is
    # harmless: they are equal); torch 2.11, on the GPU machine, knows only the old name.
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    )
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
