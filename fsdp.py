"""Fully sharded data parallelism (FSDP2, ``fully_shard``) for Swin models: the one module that
knows how a model is sharded.

With ``--fsdp`` (``TRAIN.FSDP``) every Swin block (V1 or V2, SimMIM's encoder included) becomes
its own FSDP unit and the root module a last one holding what is left (patch embedding, patch
merging, final norm, head or SimMIM decoder). Each rank then keeps 1/N of every parameter, of its
gradient and of the optimizer state; a unit's full parameters exist only while it runs, gathered
just before its forward (and again for its backward), and its gradients are reduce-scattered back
to the shards. Parameters stay ``nn.Parameter`` objects with their names (``DTensor`` values), so
the optimizer's weight-decay and layer-decay groups, built after sharding, work on names as
before and hold the shards.

What changes elsewhere: no gradient sync on non-update micro-steps (:func:`no_grad_sync`), every
rank must run the same number of forwards, also in evaluation (:func:`forwards_to_pad`), the
checkpoint is written by every rank (``sharded_checkpoint.py``), and weights from a file go in
before sharding (``model.load_state_dict`` cannot copy full tensors into shards; a plain
optimizer state goes in after, through :func:`load_full_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distributed import DistEnv, all_gather_object, autocast_context
from errors import UserError
from models.compile import run_eagerly

logger = logging.getLogger(__name__)

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch keeps FSDP2 under _composable
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def ensure_process_group(env: DistEnv) -> DistEnv:
    """``env`` itself under torchrun; in a plain single process, a 1-rank group started here.

    ``fully_shard`` needs a process group even for one rank. Starting one (an in-memory store,
    gloo on the CPU, NCCL on a GPU) keeps a single-process ``--fsdp`` run on the same code path as
    a sharded one: DTensor parameters, collective checkpoint saves, and resuming a checkpoint of
    N ranks. Nothing is sharded with one rank; the log says so and how to launch N.
    """
    if env.distributed:
        return env
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        backend = "gloo"
        if env.device.type == "cuda":
            backend, kwargs["device_id"] = "nccl", env.device
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    logger.info(
        "--fsdp in a single process: training as 1 rank of a 1-rank group (nothing to shard); "
        "launch with torchrun --nproc_per_node=N to shard over N processes"
    )
    return dataclasses.replace(env, distributed=True)


@contextlib.contextmanager
def same_initial_weights(seed: int, enabled: bool = True) -> Iterator[None]:
    """Build the model inside this block: every rank then draws the same initial weights.

    Ranks are seeded apart (seed + rank) for their augmentation and dropout. DDP broadcasts rank
    0's weights when it wraps the model, FSDP does not: each rank keeps its shard of the weights
    it built itself, so the weights of differently seeded ranks would be a patchwork. The CPU
    generator (models are built on the CPU) is seeded with ``seed`` for the block and restored
    after it, so each rank's own stream goes on as before. A single process gets the weights of
    a run without ``--fsdp`` (rank 0 is seeded with ``seed`` too).
    """
    if not enabled:
        yield
        return
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(int(seed))
    try:
        yield
    finally:
        torch.set_rng_state(state)


def _check_same_weights(model: nn.Module) -> None:
    """RuntimeError unless every rank holds the same unsharded weights (a checksum each)."""
    with torch.no_grad():
        total = sum(float(p.detach().double().sum()) for p in model.parameters())
    sums = all_gather_object(total)
    if len(set(sums)) > 1:
        raise RuntimeError(
            f"ranks built different initial weights (checksums {sums}); build the model inside "
            "fsdp.same_initial_weights or load the same checkpoint on every rank before sharding"
        )


def swin_blocks(model: nn.Module) -> list[nn.Module]:
    """Every Swin block of ``model`` (V1 or V2; through SimMIM's ``encoder``), in forward order."""
    from models.windows import WindowBlockBase

    return [m for m in model.modules() if isinstance(m, WindowBlockBase)]


def mixed_precision_dtype(device: torch.device, amp_enabled: bool, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype FSDP gathers parameters in: bfloat16 for bf16 AMP on a GPU, else None (as stored).

    Gathering bf16 halves the all-gather traffic and the memory of a unit's full parameters;
    gradients are still reduced and the shards and optimizer state kept in fp32. On the CPU
    autocast does the casting (there is no communication worth halving on one host).
    """
    if device.type == "cuda" and amp_enabled and amp_dtype == torch.bfloat16:
        return torch.bfloat16
    return None


def shard_model(
    model: nn.Module,
    env: DistEnv,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` in place over all ranks: each Swin block, then the root; returns ``model``.

    Args:
        model: a Swin V1/V2 classifier or SimMIM model, the same weights on every rank (built
            in :func:`same_initial_weights`, or loaded), on the CPU: each unit is moved to
            ``env.device`` as it is sharded, so no device ever holds the whole model. A plain
            ``load_state_dict`` no longer works afterwards.
        env: a distributed environment (:func:`ensure_process_group`).
        param_dtype: gather parameters in this dtype (:func:`mixed_precision_dtype`); gradients
            are reduced in fp32 either way. Swin V2 models are gathered in fp32 regardless.
        reshard_after_forward: free each block's gathered parameters after its forward (gather
            them again for backward): less memory for one more all-gather per block. The root
            keeps its own until backward, as FSDP does for the root anyway.

    Build the optimizer after this call, so that it holds the sharded parameters.
    """
    if not env.distributed:
        raise UserError("--fsdp needs a process group; launch with torchrun (or let main.py start a 1-rank one)")
    blocks = swin_blocks(model)
    if not blocks:
        raise UserError(f"--fsdp shards Swin blocks, and {type(model).__name__} has none; train it without --fsdp")
    from torch.distributed.device_mesh import init_device_mesh

    if param_dtype is not None and any(hasattr(getattr(b, "attn", None), "cpb_mlp") for b in blocks):
        # V2 computes its position bias (an MLP on fp32 coordinates) and attention scale with
        # autocast off, in fp32: bf16-gathered weights there would not even multiply.
        logger.info("FSDP: Swin V2 keeps its position-bias MLP in float32: weights are gathered in float32")
        param_dtype = None
    _check_same_weights(model)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # FSDP warns that a block returns a view, as an in-place op on it would skip the gather for
    # backward. Swin's blocks return their residual sum, and no caller modifies it in place
    # (residual_add writes into the next branch's output, never into its input).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # No input is cast: blocks keep their residual stream in fp32 (autocast does the bf16
    # compute), and the root's images stay fp32 for SimMIM's reconstruction target (autocast
    # casts them for the patch embedding's convolution, as without --fsdp).
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    total, local = count_elements(model)
    logger.info(
        "FSDP: %d Swin blocks + the root sharded over %d rank(s); this rank holds %s of %s parameters "
        "(%.1f%%), gathered in %s, gradients reduced in float32, reshard after forward %s",
        len(blocks),
        env.world_size,
        f"{local:,}",
        f"{total:,}",
        100.0 * local / max(total, 1),
        "bfloat16" if param_dtype == torch.bfloat16 else "float32",
        reshard_after_forward,
    )
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or what a compile wrapper wraps) is an FSDP2 root."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def count_elements(model: nn.Module) -> tuple[int, int]:
    """(all elements, this rank's elements) of ``model``'s parameters; equal when unsharded."""
    total = local = 0
    for p in model.parameters():
        total += p.numel()  # a DTensor's numel is the global one
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return total, local


@contextlib.contextmanager
def no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate this backward's gradients locally, without reducing them across ranks.

    DDP: ``model.no_sync()``. FSDP: ``set_requires_gradient_sync(False)`` on every unit for the
    duration (the unsharded gradients accumulate until the update micro-step, which reduces them
    all at once). Anything else (one process): nothing to skip.
    """
    target = getattr(model, "_orig_mod", model)
    if isinstance(target, FSDPModule):
        target.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            target.set_requires_gradient_sync(True)
    elif hasattr(target, "no_sync"):
        with target.no_sync():
            yield
    else:
        yield


def forwards_to_pad(model: nn.Module, env: DistEnv, batches: int) -> int:
    """How many throw-away forwards this rank must add to its ``batches`` to match the busiest rank.

    An FSDP forward all-gathers each unit's parameters, so a rank with fewer evaluation batches
    than another (exact evaluation splits an odd set unevenly) would leave the others waiting in
    their next forward. Collective when ``model`` is sharded: call it on every rank before the
    loop; 0 without sharding.
    """
    if not is_sharded(model) or env.world_size == 1:
        return 0
    most = torch.tensor([batches], dtype=torch.int64, device=env.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - batches


def pad_forwards(model: nn.Module, config: Any, env: DistEnv, count: int) -> None:
    """Run ``count`` forwards of a one-image zero batch (SimMIM: with an empty mask) whose outputs
    are dropped, so this rank joins the gathers the other ranks' real batches start. A no-op
    unless ``model`` is sharded."""
    if count <= 0 or not is_sharded(model):
        return
    from config import is_pretraining, model_section

    section = model_section(config)
    size = config.DATA.IMG_SIZE
    inputs = [torch.zeros(1, section.IN_CHANS, size, size, device=env.device)]
    if is_pretraining(config):
        grid = size // section.PATCH_SIZE
        inputs.append(torch.zeros(1, grid, grid, dtype=torch.long, device=env.device))
    # Eager: a compiled model would otherwise compile every block again for the one-image batch.
    with torch.no_grad(), autocast_context(env.device, config.AMP_ENABLE, config.AMP_DTYPE), run_eagerly():
        for _ in range(count):
            model(*inputs)


def global_grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the norm ``clip_grad_norm_`` returned: over DTensor gradients it is a
    replicated DTensor that already holds the norm of all shards together."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a plain ``optimizer.state_dict()`` (parameters numbered, tensors whole) into the
    optimizer of a sharded ``model``: numbers become parameter names, each rank keeps its shard.

    The numbering is that of ``optimizer.param_groups``, flattened in order, which is how the
    checkpoint's optimizer numbered them (the same groups; :func:`optimizer.load_optimizer_state`
    checks that first).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from optimizer import _IMPL_FLAGS, _check_same_groups

    _check_same_groups(optimizer.param_groups, state.get("param_groups", []))
    flags = {k: optimizer.defaults[k] for k in _IMPL_FLAGS if k in optimizer.defaults}
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_state = state.get("state", {})
    by_name = {
        "state": {names[int(i)]: entry for i, entry in saved_state.items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    for group in optimizer.param_groups:
        group.update(flags)  # this run's foreach/fused choice, not the saving run's


def sharded_grad_scaler(scaler: torch.amp.GradScaler) -> torch.amp.GradScaler:
    """For float16 on CUDA (an enabled scaler), the FSDP scaler: it unscales the gradient shards
    and agrees with the other ranks on whether any of them overflowed, so that all ranks skip the
    same steps. A disabled scaler (bf16, fp32) is returned as it is."""
    if not scaler.is_enabled():
        return scaler
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device="cuda", init_scale=scaler.get_scale())
