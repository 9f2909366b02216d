"""The forward pass of ``--eval``, ``--throughput`` and ``scripts/predict.py``.

Eager (the default) is the model as trained, under the run's autocast; every attention module
builds its position bias plus shift mask once and reuses it while the weights are unchanged (the
eval cache), so nothing derived from the weights is rebuilt per batch. On a CPU the linear
layers' weights are also reordered once for oneDNN (``models.prepacked``), in float32, or under
bf16 autocast as a bf16 copy: autocast would cast every weight to bf16 on every call, and the
packed product gives the same bits as autocast's, so ``--eval`` still reproduces the training-time
figures exactly. Swin-T 224 batch 16 on a 2-core AMD EPYC with AVX-512 BF16 (README,
"Performance"): fp32 9.8 -> 14.4 images/s (the benchmark's fast-path row, same run); bf16
autocast 22.9 -> 26.4 (interleaved rounds), as fast as casting the whole model to bf16. V1's
windows' attention takes the explicit math in bf16 on the CPU
(``models.swin_transformer.resolve_attn_impl``).

``--compile`` (``TRAIN.COMPILE``) compiles the whole model once for inference instead of block by
block as for training:

* on a CPU, with Inductor's *freezing*: the weights become constants of the graph, so the linear
  layers' weights are prepacked for oneDNN and everything computed from weights alone (the bias
  gathered from its table, the shift mask added) is folded at compile time. Where the run's
  precision is bf16 and the CPU multiplies bf16 natively (AVX-512 BF16 or AMX), the weights are
  cast to bf16 once beforehand, so the graph holds no casts; inputs go in as bf16 and logits come
  out as float32. Under ``torch.compile`` the attention takes the explicit math, which Inductor
  fuses (see ``models.swin_transformer.resolve_attn_impl``).
* on a GPU, the whole model under the run's autocast.

Compiling costs its first call (80 s for Swin-T fp32 on a 2-core AVX2 CPU), so it pays for a
large evaluation, not for a handful of images; it is the only compile (``OneShapeCompiled``: a
smaller last batch runs eagerly).

On a CPU these commands also keep the process's freed memory (``RETAIN_FREED_MEMORY``,
``allocator.retain_freed_memory(large_blocks=True)``): a batch's activations are tens of MB each
(Swin-T stage 1 at batch 16: 77 MB), which glibc otherwise maps afresh and page-faults in on
every use (``main.py --throughput``, Swin-T batch 16 fp32 on a 2-core AVX2 VM: 11.8-12.1 ->
13.3-13.4 images/s; README, "Performance").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from allocator import keep_process_memory
from distributed import Precision, cpu_has_fast_bf16
from models.compile import eager_forced
from models.prepacked import prepack_linears

logger = logging.getLogger(__name__)


def _float32(out):
    """``out`` (a tensor, or lists, tuples and dicts of them) with floating-point tensors as float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    return out


class CastInputs(nn.Module):
    """Runs a model whose weights are ``dtype`` on float inputs: floating-point inputs are cast
    to ``dtype`` on the way in (images (B, C, H, W); integer inputs such as SimMIM's token masks
    pass unchanged), floating-point results to float32 on the way out (logits (B, classes), a
    loss, or a backbone's list of feature maps)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *inputs: torch.Tensor):
        cast = [t.to(self.dtype) if t.is_floating_point() else t for t in inputs]
        return _float32(self.model(*cast))


class FrozenCompiled(nn.Module):
    """``torch.compile(model)`` whose Inductor compiles run with weight freezing on.

    Compiling happens at the first call (and again for a new input shape), so the setting is
    applied around every call rather than when the wrapper is made;
    freezing passed through ``torch.compile(options=...)`` does not reach the pass that prepacks
    the weights (measured: the graph kept plain ``addmm`` calls and ran 16 % slower).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(*inputs)


class OneShapeCompiled(nn.Module):
    """A compiled module used for the input shapes of its first call; a call with other shapes
    (the smaller last batch of an evaluation or of predict.py) runs the same model eagerly, and so
    does any call under ``models.compile.run_eagerly()``, without taking the compiled shape.

    Compiling for a second shape would cost a second compile of the whole model (Dynamo then makes
    the batch dimension dynamic), minutes with Inductor on a CPU, for one batch that runs eagerly
    in a second or two. Any output works (logits, a feature list, SimMIM's loss), unlike padding
    the batch up to the compiled size.
    """

    def __init__(self, compiled: nn.Module, eager: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled
        # Not a submodule: its parameters are the compiled module's own.
        object.__setattr__(self, "eager", eager)
        self.shapes: tuple | None = None

    def forward(self, *inputs: torch.Tensor):
        shapes = tuple(tuple(t.shape) for t in inputs)
        if eager_forced():
            # A caller's one-off batch (thinned by unreadable images) under run_eagerly(): it must
            # not become the compiled shape, or every whole batch after it would run eagerly.
            return self.eager(*inputs)
        if self.shapes is None:
            self.shapes = shapes
        if shapes == self.shapes:
            return self.compiled(*inputs)
        logger.info("inference: inputs of shape %s run eagerly (compiled for %s)", shapes, self.shapes)
        return self.eager(*inputs)


def casts_weights(device: torch.device, precision: Precision) -> bool:
    """Whether the compiled CPU path casts the weights to bf16 once (instead of autocast)."""
    return device.type == "cpu" and precision.dtype == torch.bfloat16 and cpu_has_fast_bf16()


def inference_model(
    model: nn.Module,
    device: torch.device,
    precision: Precision,
    compile: bool,
    backend: str = "inductor",
    retain_memory: bool = False,
) -> tuple[nn.Module, Precision]:
    """The module and precision to run inference with (see the module's docstring).

    ``model`` is put in eval mode with gradients off; ``retain_memory`` (``RETAIN_FREED_MEMORY``)
    applies ``allocator.keep_process_memory`` (an inference process holds one batch's activations at
    a time, so keeping that peak costs nothing; a training run's evaluation shares the trainer's
    process, which keeps its memory already). Eager, it is returned (its linears prepacked on a CPU)
    with ``precision``. Compiled, the result wraps it (``CastInputs``, a compiled module), the
    caller's ``model`` may then hold bf16 weights: use the returned module, with the returned
    ``Precision`` (float32 where the weights were cast: no autocast needed).
    """
    model.eval().requires_grad_(False)
    keep_process_memory(device.type, retain_memory, "inference")
    if compile and device.type != "cpu":
        logger.info("inference: the whole model compiled (%s), %s", backend, precision.description)
        return OneShapeCompiled(torch.compile(model, backend=backend), model), precision
    if not compile:
        if device.type == "cpu" and precision.dtype in (None, torch.bfloat16):
            packed = prepack_linears(model)
            if packed:
                in_bf16 = " (as bf16 copies: autocast's products)" if precision.dtype else ""
                logger.info("inference: the weights of %d linear layers prepacked for oneDNN%s", packed, in_bf16)
        return model, precision
    if casts_weights(device, precision):
        model = CastInputs(model.to(torch.bfloat16), torch.bfloat16)
        precision = Precision(device, None, "bfloat16 weights", "cast once; no autocast")
    frozen = backend == "inductor"
    logger.info(
        "inference: the whole model compiled (%s%s), %s; the first batch includes the compile",
        backend,
        ", weights frozen" if frozen else "",
        precision.description,
    )
    compiled = FrozenCompiled(model) if frozen else torch.compile(model, backend=backend)
    return OneShapeCompiled(compiled, model), precision
