"""ONNX export of a Swin classifier (V1 or V2), checked against onnxruntime.

The cyclic shift and window partition run as one token gather in inference (``models.windows``'
gather path: ``index_select`` with a constant permutation), which ONNX expresses as ``Gather``,
so no ``roll`` reaches the exporter. The batch dimension stays dynamic; the image size is fixed
at export (the windows, masks and position biases are built for it).

Two exporters write the file: torch's ``torch.export``-based one (``dynamo``, torch's default
since 2.9; it needs onnxscript) and the TorchScript tracer (``torchscript``), which torch has
deprecated and says it will remove. ``auto`` takes the first and falls back to the second where
the first is not installed (said in the log) or fails (a warning with its reason). Both graphs
run at the same speed in onnxruntime (Swin-T 224, batch 16, 2-core AVX2 EPYC: 11.4 and 11.0
images/s, 10 interleaved rounds); the first takes longer to write (Swin-T: 24-32 s against 3 s).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn as nn

from errors import UserError

logger = logging.getLogger(__name__)

# The opset of the TorchScript exporter: LayerNormalization (17) and everything the model uses.
# The torch.export-based exporter writes its own (20 on torch 2.14).
OPSET = 17
# Logits of onnxruntime and PyTorch must agree to this (fp32 on both sides).
TOLERANCE = 1e-4
EXPORTERS = ("auto", "dynamo", "torchscript")
# ONNX files are protobufs, which cannot exceed 2 GiB: past this, weights go to PATH.data beside.
ONE_FILE_LIMIT = 2**31 - 2**26


def dynamo_exporter_available() -> bool:
    """Whether torch's ``torch.export``-based ONNX exporter can run here (it needs onnxscript)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The named loggers at WARNING for the block: the dynamo exporter's ONNX passes log each step
    at INFO (about 330 lines for the digits demo) wherever a caller logs at INFO."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: str) -> None:
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with _quiet("onnx_ir", "onnxscript"):
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            # Left to itself the exporter writes every model's weights to a second file, PATH.data,
            # that a copied or downloaded PATH alone would miss; one file, as the TorchScript
            # exporter writes, unless the 2 GiB limit forces the split.
            external_data=weight_bytes > ONE_FILE_LIMIT,
            verbose=False,  # its progress lines would go to stdout
        )


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():
        # The tracer warns at each Python branch on a shape (padding, window count, residual
        # form). Those are meant to be constants: the image size is fixed at export, and no branch
        # depends on the batch size (verify_onnx runs another batch size than the example's).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # Chosen on purpose (--exporter torchscript, or auto's fallback): torch's notices that
        # this exporter is deprecated would only repeat that.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
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


def _wants_dynamo(exporter: str) -> bool:
    """Whether ``exporter`` (one of :data:`EXPORTERS`) starts with the torch.export-based exporter."""
    if exporter not in EXPORTERS:
        raise UserError(f"ONNX exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    if exporter == "torchscript":
        return False
    if dynamo_exporter_available():
        return True
    if exporter == "dynamo":
        raise UserError(
            "the torch.export-based ONNX exporter needs onnxscript and torch >= 2.5; pip install onnxscript"
        )
    logger.info("ONNX: the TorchScript exporter (the torch.export-based one needs onnxscript and torch >= 2.5)")
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def export_onnx(
    model: nn.Module, path: str, img_size: int, in_chans: int = 3, batch: int = 2, exporter: str = "auto"
) -> str:
    """Write ``model`` (eval mode, on the CPU) to ``path``: input ``images`` (N, in_chans, S, S) →
    ``logits`` (N, classes), N dynamic. ``exporter`` is one of :data:`EXPORTERS`; returns the one
    that wrote the file ('dynamo' or 'torchscript')."""
    use_dynamo = _wants_dynamo(exporter)
    model = model.eval().cpu()
    example = torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        if use_dynamo:
            try:
                _export_dynamo(model, example, path)
                return "dynamo"
            except OSError:
                raise  # the file cannot be written: the other exporter would fail the same way
            except Exception as e:
                # Whatever torch.export or its ONNX translation refuses; the whole trace for --debug
                # callers, one line for everyone.
                logger.debug("the torch.export-based ONNX exporter failed", exc_info=True)
                if exporter == "dynamo":
                    raise UserError(
                        f"the torch.export-based ONNX exporter failed ({_first_line(e)}); try --exporter torchscript"
                    ) from e
                logger.warning(
                    "ONNX: the torch.export-based exporter failed (%s); using the TorchScript exporter", _first_line(e)
                )
        _export_torchscript(model, example, path)
    return "torchscript"


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
