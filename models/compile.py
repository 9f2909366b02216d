"""``torch.compile`` for Swin models: each block on its own (regional) or the whole model.

Regional compilation is the default because a Swin model is a stack of few distinct blocks:
Swin-T's 12 blocks have 7 distinct shapes (4 stages x shifted / not, less the unshifted last
stage), so compiling blocks one by one traces each shape once and reuses it, while the whole
model is one large graph that Inductor compiles from scratch. The model object, its state-dict
keys and its hooks stay as they are, which keeps checkpoints, DDP and gradient checkpointing
working unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from errors import UserError

from .windows import WindowBlockBase

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("blocks", "model")


def allow_recompiles(needed: int) -> None:
    """Raise Dynamo's per-code-object recompile limit to at least ``needed``.

    The setting is ``recompile_limit`` from torch 2.7 on and ``cache_size_limit`` before.
    """
    # Imported as its own name: ``import torch._dynamo`` here would make ``torch`` a local of
    # this function (the UnboundLocalError a linter's F823 found in compile_model).
    import torch._dynamo as dynamo

    name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo.config, name) < needed:
        setattr(dynamo.config, name, needed)


def compile_model(model: nn.Module, scope: str = "blocks", backend: str = "inductor") -> nn.Module:
    """Compile ``model`` for ``backend``; returns the module to call.

    ``scope`` 'blocks': every Swin block (V1 or V2) is compiled in place
    (``nn.Module.compile``) and ``model`` itself is returned; the patch embedding, patch
    merging and head stay eager. 'model': ``torch.compile(model)``, a wrapper whose
    ``_orig_mod`` is ``model``.
    """
    if scope not in COMPILE_SCOPES:
        raise UserError(f"TRAIN.COMPILE_SCOPE is {scope!r}; use one of {', '.join(COMPILE_SCOPES)}")
    if scope == "model":
        return torch.compile(model, backend=backend)
    blocks = [m for m in model.modules() if isinstance(m, WindowBlockBase)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no Swin block to compile")
    # All blocks share one forward code object, and Dynamo counts every (shape, shift, train/eval)
    # variant against one recompile limit (8 by default): without room for each distinct block in
    # both modes, the later blocks would silently fall back to eager.
    allow_recompiles(2 * len(blocks) + 8)
    for blk in blocks:
        # dynamic=False: each block variant gets a graph specialized to its sizes. Left automatic,
        # Dynamo would see the second stage's sizes as "changing" and compile a symbolic-shape
        # graph for every later stage, slower to build and to run.
        blk.compile(backend=backend, dynamic=False)
    logger.info("compiled %d Swin blocks (%s, regional)", len(blocks), backend)
    return model


@contextlib.contextmanager
def run_eagerly() -> Iterator[None]:
    """A context in which compiled code (a compiled block or model) runs its Python eagerly and
    nothing new is compiled; a no-op before torch 2.6 (no ``torch.compiler.set_stance``)."""
    if not hasattr(torch.compiler, "set_stance"):
        yield
        return
    # Entered here, not returned: set_stance(...) changes the process's stance when called, so a
    # call whose result never entered a ``with`` would leave everything after it uncompiled.
    with torch.compiler.set_stance("force_eager"):
        yield


def eager_forced() -> bool:
    """Whether a :func:`run_eagerly` context (torch's ``force_eager`` stance) is active here."""
    from torch._dynamo import eval_frame

    stance = getattr(eval_frame, "_stance", None)  # torch >= 2.6; before it nothing forces eager
    return getattr(stance, "stance", "default") == "force_eager"


class FirstBatchSizeCompiled:
    """Per batch of an evaluation: compiled code serves the batch size of the first call; a batch
    of another size (the smaller last batch) runs eagerly. Needs torch >= 2.6 (``run_eagerly``).

    Graphs are specialized to their sizes (``dynamic=False`` above), so that one batch would
    otherwise compile every block variant again, a minute or more with Inductor on a CPU, to run
    once. Use: ``compiled_for = FirstBatchSizeCompiled()``, then per batch
    ``with compiled_for(len(images)): model(images)``.
    """

    def __init__(self) -> None:
        self.size: int | None = None

    def __call__(self, batch_size: int) -> contextlib.AbstractContextManager:
        if self.size is None:
            self.size = batch_size
        return contextlib.nullcontext() if batch_size == self.size else run_eagerly()
