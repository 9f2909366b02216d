"""ONNX export of a Swin classifier (V1 or V2), checked against onnxruntime.

The cyclic shift and window partition run as one token gather in inference (``models.windows``'
gather path: ``index_select`` with a constant permutation), which ONNX expresses as ``Gather``,
so no ``roll`` reaches the exporter. The batch dimension stays dynamic; the image size is fixed
at export (the windows, masks and position biases are built for it).
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from errors import UserError

logger = logging.getLogger(__name__)

# The opset of the TorchScript exporter: LayerNormalization (17) and everything the model uses.
OPSET = 17
# Logits of onnxruntime and PyTorch must agree to this (fp32 on both sides).
TOLERANCE = 1e-4


def export_onnx(model: nn.Module, path: str, img_size: int, in_chans: int = 3, batch: int = 2) -> None:
    """Write ``model`` (eval mode, on the CPU) to ``path``: input ``images`` (N, in_chans, S, S) →
    ``logits`` (N, classes), N dynamic."""
    model = model.eval().cpu()
    example = torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns at each Python branch on a shape (padding, window count, residual
        # form). Those are meant to be constants: the image size is fixed at export, and no branch
        # depends on the batch size (verify_onnx runs another batch size than the example's).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The TorchScript exporter: no onnxscript needed, and the same on torch 2.11 and 2.14.
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )


def onnxruntime_session(path: str, threads: int | None = None):
    """An onnxruntime CPU session for ``path``; a one-line ``UserError`` when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError("onnxruntime is not installed; pip install onnxruntime (make venv installs it)") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def verify_onnx(model: nn.Module, path: str, img_size: int, in_chans: int = 3, batch: int = 3) -> float:
    """Max |logits_onnxruntime − logits_pytorch| on a random batch of another size than the export's;
    a ``UserError`` above :data:`TOLERANCE`."""
    images = torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval().cpu()(images).numpy()
    got = onnxruntime_session(path).run(None, {"images": images.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if diff > TOLERANCE:
        raise UserError(f"{path}: onnxruntime's logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE}); not usable")
    logger.info("onnxruntime agrees with PyTorch: max |logit difference| %.2e on a batch of %d", diff, batch)
    return diff
