"""Linear layers whose weights are reordered once into oneDNN's blocked layout, for CPU inference.

``nn.Linear`` on the CPU hands its weight to the BLAS as it is stored, every call. oneDNN's linear
can instead take a weight reordered once for its kernels (what Inductor's weight freezing does in a
compiled graph); for eager inference ``prepack_linears`` swaps each ``nn.Linear`` of a model for a
``PrepackedLinear`` holding that reordered copy. Same weights, same module tree otherwise: the
parameters stay where they were (``weight``/``bias`` of the same names, so the state dict and any
code reading ``layer.weight`` are unchanged), and the packed copy is a plain attribute, rebuilt if
the weight changes in place.

Under the CPU's bf16 autocast a float32 layer packs a bf16 copy of its weight instead, once:
autocast would cast the weight (and input and bias) to bf16 on every call, and the packed
product of the same bf16 operands gives the same bits (checked for every Swin-T shape on an
AVX-512-BF16 CPU, and by a test).

Measured (README, "Performance"): Swin-T 224 batch 16 forward, memory kept: fp32 on a 2-core AMD
EPYC with AVX2 (no AVX-512) 13.2 -> 14.2 images/s (x1.06 paired); on one with AVX-512 BF16, fp32
9.8 -> 14.4 (same run) and bf16 autocast 22.9 -> 26.4. The packed call has no autograd and no
autocast rule of its own, so the layer takes the plain ``F.linear`` whenever gradients, training
mode, fp16 autocast, tracing, another device or another dtype is involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prepack_available() -> bool:
    """Whether this torch has oneDNN's linear with prepacked weights (CPU builds with mkldnn)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _autocast_on() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 spelling
        return torch.is_autocast_cpu_enabled()


def _autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # torch < 2.4 spelling
        return torch.get_autocast_cpu_dtype()


def reorder_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) reordered into oneDNN's layout for its linear (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


class PrepackedLinear(nn.Module):
    """``nn.Linear``'s forward with the weight reordered once for oneDNN (inference on the CPU).

    ``weight`` and ``bias`` are the original layer's parameters (not copied).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._packed_from: tuple[int, int, torch.dtype, torch.dtype] | None = None
        # The weight's storage as packed, held so that its address (in the key) cannot go to
        # another weight, e.g. one put in by load_state_dict(assign=True), while the key stands.
        self._packed_source: torch.Tensor | None = None
        self.train(linear.training)  # packs only in evaluation mode, as the layer it replaces is in

    def __getstate__(self) -> dict:
        # The packed copy is derived (and oneDNN's opaque tensors do not copy or pickle): rebuilt on use.
        state = self.__dict__.copy()
        state["_packed"], state["_packed_from"], state["_packed_source"] = None, None, None
        return state

    def train(self, mode: bool = True) -> PrepackedLinear:
        # torch's fused optimizers change the weight in place without bumping its version (the
        # key below): every switch between training and evaluation packs afresh.
        self._packed, self._packed_from, self._packed_source = None, None, None
        return super().train(mode)

    def _packed_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The weight in ``dtype``, reordered; None where oneDNN cannot pack this dtype on this CPU
        (bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT), remembered until the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, dtype)
        if self._packed_from != key:
            try:
                self._packed = reorder_weight(w.detach().to(dtype))
            except RuntimeError:
                self._packed = None
            self._packed_from, self._packed_source = key, w.detach()
        return self._packed

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the packed product runs in for ``x``, None for the plain ``F.linear``: the
        weight's own dtype without autocast; bf16 for a float32 layer under the CPU's bf16
        autocast, which would cast input, weight and bias to bf16 itself (the packed product then
        gives the same bits as autocast's: checked for every Swin-T shape, and by a test)."""
        w = self.weight
        if (
            x.device.type != "cpu"
            or w.device.type != "cpu"
            or (self.bias is not None and self.bias.dtype != w.dtype)
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or self.training
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            return None
        if not _autocast_on():
            return w.dtype if x.dtype == w.dtype else None
        if w.dtype == torch.float32 and x.is_floating_point() and _autocast_dtype() == torch.bfloat16:
            return torch.bfloat16
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype(x)
        packed = None if dtype is None else self._packed_weight(dtype)
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` (in place) by a ``PrepackedLinear``; how many.

    0 where this torch lacks the oneDNN ops. For inference: call after the weights are final.
    """
    if not prepack_available():
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PrepackedLinear(child))
                swapped += 1
    return swapped
