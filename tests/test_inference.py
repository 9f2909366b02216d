"""inference.py, the forward pass of --eval, --throughput and predict: eager as trained, or
compiled once for inference (frozen weights; bf16 weights cast once where the CPU has native
bf16), and the attention path ``auto`` takes under torch.compile."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch

import inference
from distributed import Precision
from models.swin_transformer import SwinTransformer, resolve_attn_impl
from models.swin_transformer_v2 import SwinTransformerV2

CPU = torch.device("cpu")


def tiny(family: str = "v1") -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    if family == "v1":
        model = SwinTransformer(num_classes=7, **kwargs)
    else:
        model = SwinTransformerV2(num_classes=7, pretrained_window_sizes=(0, 0), **kwargs)
    # Away from the initial values (V2's res-post-norm weights start at zero, which would make
    # every block an identity and hide the attention's precision).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_without_compile_the_model_runs_as_trained_in_eval_mode_without_gradients():
    model = tiny().train()
    precision = Precision(CPU, torch.bfloat16, "bf16 autocast")
    out, p = inference.inference_model(model, CPU, precision, compile=False)
    assert out is model and p is precision
    assert not model.training and not any(q.requires_grad for q in model.parameters())


def test_cast_inputs_feeds_a_bf16_model_float_images_and_returns_float32_logits():
    model = tiny().eval().to(torch.bfloat16)
    wrapped = inference.CastInputs(model, torch.bfloat16)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = wrapped(x)
        expected = model(x.to(torch.bfloat16)).float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)

    # Integer inputs (SimMIM's token masks) pass unchanged.
    class Probe(torch.nn.Module):
        def forward(self, images, mask):
            seen.extend([images.dtype, mask.dtype])
            return images

    seen = []
    inference.CastInputs(Probe(), torch.bfloat16)(torch.ones(2), torch.zeros(2, dtype=torch.long))
    assert seen == [torch.bfloat16, torch.long]

    # A backbone's list of feature maps comes back as float32 maps, integer outputs as they are.
    class Pyramid(torch.nn.Module):
        def forward(self, images):
            return [images, images[:, :1]], {"ids": images.long()}

    maps, extra = inference.CastInputs(Pyramid(), torch.bfloat16)(torch.ones(1, 3, 2, 2))
    assert [m.dtype for m in maps] == [torch.float32] * 2 and extra["ids"].dtype == torch.long


def test_compiled_on_a_native_bf16_cpu_the_weights_are_cast_once_and_logits_stay_within_bf16_error(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: True)
    for family in ("v1", "v2"):
        model = tiny(family).eval()
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            reference = model(x)
        bf16 = Precision(CPU, torch.bfloat16, "bf16 autocast")
        fast, precision = inference.inference_model(model, CPU, bf16, compile=True, backend="aot_eager")
        assert precision.dtype is None and "bfloat16 weights" in precision.description
        assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
        with torch.no_grad(), precision.autocast():
            out = fast(x)
        assert out.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: a few parts in a thousand of the logits' scale.
        err = (out - reference).abs().max() / reference.abs().max()
        assert 0 < err < 0.03, (family, float(err))


def test_eager_bf16_stays_under_autocast_with_bf16_packed_linears_and_autocasts_exact_logits():
    """Eager bf16 (--eval, --throughput, predict) keeps the float32 model under autocast, so
    --eval equals the training-time figures; only the linears' bf16 weights are packed once."""
    from models.prepacked import PrepackedLinear, prepack_available

    bf16 = Precision(CPU, torch.bfloat16, "bf16 autocast")
    for family in ("v1", "v2"):
        model = tiny(family).eval()
        plain = copy.deepcopy(model)
        x = torch.randn(4, 3, 32, 32)
        fast, p = inference.inference_model(model, CPU, bf16, compile=False)
        assert fast is model and p is bf16 and {q.dtype for q in model.parameters()} == {torch.float32}
        assert isinstance(model.head, PrepackedLinear) == prepack_available()
        with torch.no_grad(), bf16.autocast():
            assert torch.equal(fast(x), plain(x)), family


def test_compiled_without_native_bf16_or_in_fp32_the_weights_stay_float32(monkeypatch):
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    for precision in (Precision(CPU, torch.bfloat16, "bf16 autocast"), Precision(CPU, None, "float32")):
        model = tiny()
        fast, p = inference.inference_model(model, CPU, precision, compile=True, backend="aot_eager")
        assert p is precision and {q.dtype for q in fast.parameters()} == {torch.float32}
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)


def test_auto_attention_is_the_math_under_torch_compile_and_sdpa_for_eager_fp32_inference(monkeypatch):
    import models.swin_transformer as v1

    with torch.no_grad():
        assert resolve_attn_impl("auto", CPU) == "sdpa"
        assert resolve_attn_impl("auto", torch.device("cuda")) == "sdpa"
    with torch.no_grad():  # the fused CPU kernel loses to the math in bf16 and fp16
        assert resolve_attn_impl("auto", CPU, torch.bfloat16) == "reference"
        assert resolve_attn_impl("auto", CPU, torch.float16) == "reference"
        assert resolve_attn_impl("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
    assert resolve_attn_impl("auto", CPU) == "reference"  # CPU training
    assert resolve_attn_impl("auto", torch.device("cuda")) == "sdpa"
    monkeypatch.setattr(v1, "_is_compiling", lambda: True)
    with torch.no_grad():
        assert resolve_attn_impl("auto", CPU) == "reference"
        assert resolve_attn_impl("auto", torch.device("cuda")) == "reference"
    assert resolve_attn_impl("sdpa", CPU) == "sdpa"  # an explicit choice stands


def test_the_inductor_compile_runs_with_weight_freezing_on_at_every_call(monkeypatch):
    from torch._inductor import config as inductor_config

    seen = []

    def fake_compile(model, **kwargs):
        def call(*inputs):
            seen.append(inductor_config.freezing)
            return model(*inputs)

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)
    fast, _ = inference.inference_model(tiny(), CPU, Precision(CPU, None, "float32"), compile=True)
    assert isinstance(fast.compiled, inference.FrozenCompiled)
    frozen = fast.compiled
    with torch.no_grad():
        frozen(torch.randn(2, 3, 32, 32))
        frozen(torch.randn(1, 3, 32, 32))  # a new shape recompiles: frozen too
    assert seen == [True, True] and inductor_config.freezing is False


def test_compiled_inference_compiles_once_and_runs_a_smaller_last_batch_eagerly(caplog):
    """One graph for a whole evaluation: not a second compile for the window caches being filled
    by the first call, nor for the last batch (it runs eagerly, with the same logits)."""
    import logging

    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for family in ("v1", "v2"):
        model = tiny(family).eval()
        reference = copy.deepcopy(model)
        # Dynamo's eager backend: its guards and graphs alone decide what compiles again.
        fast, _ = inference.inference_model(model, CPU, Precision(CPU, None, "float32"), True, "eager")
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="inference"):
            for batch in (4, 4, 3):
                x = torch.randn(batch, 3, 32, 32)
                torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=0)
        eager_line = "inference: inputs of shape ((3, 3, 32, 32),) run eagerly (compiled for ((4, 3, 32, 32),))"
        assert eager_line in caplog.text
    assert counters["stats"]["unique_graphs"] == 2, counters["stats"]  # one per family
    torch._dynamo.reset()


def test_a_compiled_shifted_block_reads_its_window_caches_without_guarding_on_them():
    """A compiled block builds its token permutation and shift mask in the graph: filling the
    caches (by this call, or by an eager model of the same size) does not make it compile again."""
    import torch._dynamo

    from models.swin_transformer import SwinTransformerBlock
    from models.windows import _MASKS, _PERMUTATIONS

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    _MASKS.clear()
    _PERMUTATIONS.clear()
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=4, shift_size=2).eval()
    compiled = torch.compile(block, backend="aot_eager")
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        first = compiled(x)
        assert not _MASKS and not _PERMUTATIONS  # built in the graph, not cached
        eager = block(x)  # fills both caches
        assert _MASKS and _PERMUTATIONS
        torch.testing.assert_close(compiled(x), eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(first, eager, atol=1e-6, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]
    torch._dynamo.reset()


def test_inference_keeps_freed_memory_on_the_cpu_only_when_asked(kept_memory_calls):
    from allocator import keep_process_memory

    calls = kept_memory_calls  # conftest records retain_freed_memory's calls
    assert keep_process_memory("cpu", True, "inference") is True and calls == [True]
    assert keep_process_memory("cpu", False, "inference") is False
    assert keep_process_memory("cuda", True, "inference") is False
    assert calls == [True]  # neither of the last two touched the allocator
    inference.inference_model(tiny(), CPU, Precision(CPU, None, "float32"), compile=False, retain_memory=True)
    inference.inference_model(tiny(), CPU, Precision(CPU, None, "float32"), compile=False)
    assert calls == [True, True]


def test_an_inference_process_stops_faulting_in_each_batchs_large_activations():
    # In a child process, so this process's allocator stays as it is: after inference_model with
    # retain_memory, freed blocks over glibc's 32 MiB mmap limit (Swin-T's stage-1 activations at
    # batch 16 are 77 MB) are reused instead of mapped and page-faulted in again per batch.
    script = (
        "import resource, sys, torch\n"
        "import inference\n"
        "from distributed import Precision\n"
        "cpu = torch.device('cpu')\n"
        "inference.inference_model(torch.nn.Identity(), cpu, Precision(cpu, None, 'float32'), False,"
        " retain_memory=sys.argv[1] == 'keep')\n"
        "for _ in range(20): torch.ones(12 << 20).sum()\n"
        "start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): torch.ones(12 << 20).sum()\n"  # 48 MiB each, as one batch's activation
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    counts = {}
    for mode in ("defaults", "keep"):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout.split()[-1])
    # About 123,000 pages when each 48 MiB buffer is mapped afresh. Kept, the heap grows for the
    # first 3-8 buffers (a buffer's 12,288 faults each; it varies by run and machine, and CI once
    # saw five after two warm-ups) before freed ones are reused: after twenty, at most two more.
    assert counts["keep"] <= 2 * 12_288 < 100_000 < counts["defaults"], counts


def test_a_first_batch_thinned_by_unreadable_images_runs_eagerly_and_the_whole_batches_take_the_compile(
    tmp_path, caplog
):
    """predict.py with --compile, an unreadable image in the first chunk: that chunk of 2 runs
    under run_eagerly() and does not become the compiled shape; the chunks of 3 after it compile."""
    import logging

    import numpy as np
    import torch._dynamo
    from PIL import Image

    from config import get_config
    from data.build import build_transform

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import predict

    torch._dynamo.reset()
    model = tiny("v1").eval()
    fast, _ = inference.inference_model(copy.deepcopy(model), CPU, Precision(CPU, None, "float32"), True, "eager")
    paths = []
    for i in range(9):
        path = tmp_path / f"{i}.png"
        if i == 0:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(path)
        paths.append(str(path))
    config = get_config(None, ["DATA.IMG_SIZE", "32"])
    with caplog.at_level(logging.INFO, logger="inference"):
        results = predict.predict(fast, build_transform(False, config), paths, None, topk=1, batch_size=3)
    assert len(results) == 8 and fast.shapes == ((3, 3, 32, 32),)
    assert "run eagerly" not in caplog.text  # no whole chunk fell back to eager
    torch._dynamo.reset()
