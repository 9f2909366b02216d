"""Tests for kernels/window_process.py.

The Triton kernel runs on CPU only under Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before Triton is imported. Other tests in this pytest process may
already have imported torch/triton, so the interpreter checks run in ONE subprocess: this
file re-executed as a script (see ``_worker_main`` at the bottom) with the variable set.
It reports one JSON result per case, and the parametrized tests below assert on them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from kernels import window_process as wp  # noqa: E402
from models import windows  # noqa: E402

_RESULT_MARKER = "KERNEL_CHECK_RESULTS:"

# (B, H, W, C, M, shift, dtype)
_SHAPES = [
    (2, 8, 8, 6, 4, 0),
    (2, 8, 8, 6, 4, 2),
    (2, 12, 12, 16, 4, 2),
    (2, 8, 12, 10, 4, 2),  # H != W
    (2, 12, 8, 8, 4, 0),  # H != W, no shift
]
_CASES = [
    dict(id=f"{dt}-B{B}-{H}x{W}-C{C}-M{M}-s{s}", B=B, H=H, W=W, C=C, M=M, shift=s, dtype=dt)
    for dt in ("float32", "bfloat16")
    for (B, H, W, C, M, s) in _SHAPES
]
_CASES += [
    # float16 too.
    dict(id="float16-B2-8x12-C6-M4-s2", B=2, H=8, W=12, C=6, M=4, shift=2, dtype="float16"),
    # C > 128: several channel tiles, the last one masked.
    dict(id="float32-B1-8x8-C130-M4-s2", B=1, H=8, W=8, C=130, M=4, shift=2, dtype="float32"),
    # Swin-T stage-1 geometry (window 7, shift 3), one image.
    dict(id="float32-B1-56x56-C96-M7-s3", B=1, H=56, W=56, C=96, M=7, shift=3, dtype="float32"),
    # Negative shift and shift larger than the image wrap around like torch.roll.
    dict(id="float32-B2-8x8-C6-M4-s-2", B=2, H=8, W=8, C=6, M=4, shift=-2, dtype="float32"),
    dict(id="float32-B1-8x12-C6-M4-s10", B=1, H=8, W=12, C=6, M=4, shift=10, dtype="float32"),
    # Non-contiguous input (a channel slice) is made contiguous first.
    dict(id="float32-B2-8x8-C6-M4-s2-noncontig", B=2, H=8, W=8, C=6, M=4, shift=2, dtype="float32", noncontig=True),
]
_CASE_IDS = [c["id"] for c in _CASES]
_DISPATCH_CASE = "dispatch-uses-kernel"


# ----------------------------------------------------------------------------------------
# Worker side (runs in the subprocess with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------


def _check_case(case: dict) -> str:
    """Return '' when everything matches exactly, else a description of the first mismatch."""
    dtype = getattr(torch, case["dtype"])
    B, H, W, C, M, s = (case[k] for k in ("B", "H", "W", "C", "M", "shift"))
    gen = torch.Generator().manual_seed(zlib.crc32(case["id"].encode()))
    if case.get("noncontig"):
        base = torch.randn(B, H, W, 2 * C, generator=gen).to(dtype)
        x = base[..., ::2]
        assert not x.is_contiguous()
    else:
        x = torch.randn(B, H, W, C, generator=gen).to(dtype)

    # shift + partition: forward and backward.
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    out = kernels.fused_shift_partition(x1, s, M)
    ref = window_partition_ref(torch.roll(x2, shifts=(-s, -s), dims=(1, 2)), M)
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shift_partition shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}"
    if not torch.equal(out, ref):
        return "shift_partition forward differs"
    g = torch.randn(out.shape, generator=gen).to(dtype)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    if not torch.equal(x1.grad, x2.grad):
        return "shift_partition backward differs"

    # reverse + unshift: forward and backward.
    win = ref.detach()
    w1 = win.clone().requires_grad_(True)
    w2 = win.clone().requires_grad_(True)
    back = kernels.fused_reverse_unshift(w1, s, M, H, W)
    back_ref = torch.roll(windows.window_reverse(w2, M, H, W), shifts=(s, s), dims=(1, 2))
    if back.shape != back_ref.shape or back.dtype != back_ref.dtype:
        return f"reverse_unshift shape/dtype {tuple(back.shape)} {back.dtype}"
    if not torch.equal(back, back_ref):
        return "reverse_unshift forward differs"
    if not torch.equal(back, x):
        return "reverse_unshift(shift_partition(x)) != x"
    g2 = torch.randn(back.shape, generator=gen).to(dtype)
    (back * g2).sum().backward()
    (back_ref * g2).sum().backward()
    if not torch.equal(w1.grad, w2.grad):
        return "reverse_unshift backward differs"
    return ""


def window_partition_ref(x: torch.Tensor, M: int) -> torch.Tensor:
    """The brief's definition, written out here independently of kernels/."""
    B, H, W, C = x.shape
    return x.view(B, H // M, M, W // M, M, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, M, M, C)


def _check_dispatch_uses_kernel() -> str:
    """Under the interpreter, models.windows' shift_partition/reverse_unshift(fused=True) take the kernel."""
    x = torch.randn(2, 8, 12, 6)
    if not kernels.kernel_available(x):
        return "kernel_available(cpu tensor) is False under TRITON_INTERPRET=1"

    def _boom(*a, **k):
        raise AssertionError("PyTorch path used")

    names = ("roll_shift_partition", "roll_reverse_unshift", "gather_shift_partition", "gather_reverse_unshift")
    saved = {n: getattr(windows, n) for n in names}
    for n in names:
        setattr(windows, n, _boom)
    try:
        win = windows.shift_partition(x, 2, 4, fused=True)
        back = windows.reverse_unshift(win, 2, 4, 8, 12, fused=True)
    finally:
        for n, fn in saved.items():
            setattr(windows, n, fn)
    if wp._FUSED_DISABLED:
        return "fused path was disabled after a failure"
    if not torch.equal(win, windows.roll_shift_partition(x, 2, 4).view(-1, 16, 6)):
        return "dispatcher (fused) forward differs"
    if not torch.equal(back, x):
        return "dispatcher (fused) round trip differs"
    return ""


def _worker_main(case_ids: list) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    by_id = {c["id"]: c for c in _CASES}
    for cid in case_ids:
        try:
            results[cid] = _check_dispatch_uses_kernel() if cid == _DISPATCH_CASE else _check_case(by_id[cid])
        except Exception as exc:  # report, don't crash: the other cases still count
            results[cid] = f"raised {type(exc).__name__}: {exc}"
    print(_RESULT_MARKER + json.dumps(results))


# ----------------------------------------------------------------------------------------
# pytest side
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    if not wp._triton_importable():
        pytest.skip("Triton is not installed: the kernel runs only under Triton (its interpreter on CPU)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(_CASE_IDS + [_DISPATCH_CASE])],
        env=env,
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARKER)]
    assert proc.returncode == 0 and lines, (
        f"interpreter subprocess failed (rc={proc.returncode})\n"
        f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1][len(_RESULT_MARKER) :])


@pytest.mark.parametrize("case_id", _CASE_IDS)
def test_interpreter_matches_torch(interpreter_results, case_id):
    assert interpreter_results[case_id] == "", interpreter_results[case_id]


def test_interpreter_dispatcher_uses_kernel(interpreter_results):
    assert interpreter_results[_DISPATCH_CASE] == "", interpreter_results[_DISPATCH_CASE]


# --- in-process tests: the PyTorch path and the fallback ---------------------------------


def test_reference_definitions_roundtrip():
    x = torch.randn(2, 8, 12, 5)
    win = windows.window_partition(x, 4)
    assert win.shape == (2 * 2 * 3, 4, 4, 5)
    # Window 1 of image 0 is rows 0..3, cols 4..7 (row-major over the window grid).
    assert torch.equal(win[1], x[0, 0:4, 4:8])
    # Window 6 is the first window of image 1.
    assert torch.equal(win[6], x[1, 0:4, 0:4])
    assert torch.equal(windows.window_reverse(win, 4, 8, 12), x)
    assert torch.equal(windows.roll_reverse_unshift(windows.roll_shift_partition(x, 2, 4), 2, 4, 8, 12), x)
    assert torch.equal(windows.roll_shift_partition(x, 0, 4), win)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatcher_falls_back_without_interpreter(monkeypatch, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8, 12, 6).to(dtype)
    assert kernels.kernel_available(x) is False

    def _boom(*a, **k):
        raise AssertionError("kernel must not be used")

    monkeypatch.setattr(wp, "fused_shift_partition", _boom)
    monkeypatch.setattr(wp, "fused_reverse_unshift", _boom)
    for fused in (True, False):
        win = windows.shift_partition(x, 2, 4, fused=fused)
        assert torch.equal(win, window_partition_ref(torch.roll(x, (-2, -2), (1, 2)), 4).view(-1, 16, 6))
        back = windows.reverse_unshift(win, 2, 4, 8, 12, fused=fused)
        assert torch.equal(back, x)


def test_fallback_when_triton_missing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setattr(wp, "_TRITON_IMPORTABLE", None)
    x = torch.randn(1, 8, 8, 4)
    assert kernels.kernel_available(x) is False
    win = windows.shift_partition(x, 2, 4, fused=True)
    assert torch.equal(win, windows.roll_shift_partition(x, 2, 4).view(-1, 16, 4))


def test_kernel_available_is_false_for_anything_but_a_cuda_tensor_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.kernel_available(None) is False
    assert kernels.kernel_available(object()) is False
    assert kernels.kernel_available(torch.zeros(1)) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter takes CPU tensors, when Triton imports
    assert kernels.kernel_available(torch.zeros(1)) is wp._triton_importable()


def test_dispatcher_falls_back_when_kernel_fails(monkeypatch, caplog):
    monkeypatch.setattr(wp, "_FUSED_DISABLED", False)
    monkeypatch.setattr(wp, "kernel_available", lambda t: True)

    def _broken_launch(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(wp, "_launch", _broken_launch)
    x = torch.randn(2, 8, 8, 6)
    with caplog.at_level(logging.WARNING, logger=wp.__name__):
        win = windows.shift_partition(x, 2, 4, fused=True)
    assert torch.equal(win, windows.roll_shift_partition(x, 2, 4).view(-1, 16, 6))
    assert wp._FUSED_DISABLED is True
    assert any("simulated compile failure" in r.getMessage() for r in caplog.records)
    # Later calls go straight to PyTorch.
    assert torch.equal(windows.reverse_unshift(win, 2, 4, 8, 8, fused=True), x)


def test_bad_input_raises_value_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="multiples of window_size"):
        kernels.fused_shift_partition(torch.randn(1, 10, 8, 4), 2, 4)
    with pytest.raises(ValueError, match="dtype"):
        kernels.fused_shift_partition(torch.randn(1, 8, 8, 4, dtype=torch.float64), 2, 4)
    with pytest.raises(ValueError, match="multiple of nW"):
        kernels.fused_reverse_unshift(torch.randn(3, 4, 4, 4), 2, 4, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        kernels.fused_shift_partition(torch.randn(8, 8, 4), 2, 4)


def _imported_modules(path: Path) -> set:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_kernels_and_window_plumbing_import_nothing_from_the_model_files():
    """kernels/ imports nothing from models (at any depth: no import inside a function either);
    models/windows.py imports kernels and no model file, so V1 and V2 share it without a cycle."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        assert not [m for m in _imported_modules(path) if m.startswith(("models", ".."))], path.name
    window_imports = _imported_modules(ROOT / "models" / "windows.py")
    assert "kernels" in window_imports
    assert not [m for m in window_imports if m.startswith(("models", "."))], window_imports


def test_import_does_not_import_triton():
    code = "import sys, kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- CUDA -------------------------------------------------------------------------------

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 3])
def test_cuda_matches_torch(dtype, shift):
    B, H, W, C, M = 4, 56, 56, 96, 7
    torch.manual_seed(0)
    x = torch.randn(B, H, W, C, device="cuda").to(dtype)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out = kernels.fused_shift_partition(x1, shift, M)
    ref = windows.roll_shift_partition(x2, shift, M)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(x1.grad, x2.grad)

    w1 = ref.detach().clone().requires_grad_(True)
    w2 = ref.detach().clone().requires_grad_(True)
    back = kernels.fused_reverse_unshift(w1, shift, M, H, W)
    back_ref = windows.roll_reverse_unshift(w2, shift, M, H, W)
    assert torch.equal(back, back_ref)
    assert torch.equal(back, x)
    g2 = torch.randn_like(back)
    (back * g2).sum().backward()
    (back_ref * g2).sum().backward()
    assert torch.equal(w1.grad, w2.grad)


@_cuda
def test_cuda_dispatcher_uses_kernel(monkeypatch):
    monkeypatch.setattr(wp, "_FUSED_DISABLED", False)

    def _boom(*a, **k):
        raise AssertionError("PyTorch path used")

    x = torch.randn(2, 28, 28, 192, device="cuda", dtype=torch.float16)
    ref = windows.roll_shift_partition(x, 3, 7).view(-1, 49, 192)
    for name in ("roll_shift_partition", "roll_reverse_unshift", "gather_shift_partition", "gather_reverse_unshift"):
        monkeypatch.setattr(windows, name, _boom)
    assert kernels.kernel_available(x)
    win = windows.shift_partition(x, 3, 7, fused=True)
    assert torch.equal(win, ref)
    assert torch.equal(windows.reverse_unshift(win, 3, 7, 28, 28, fused=True), x)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
