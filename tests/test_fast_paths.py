"""The model's fast paths give the same answers as the plain ones.

* cyclic shift + window partition as one gather (and its inverse, and their backward) equals
  roll + partition exactly;
* the eval-mode cache of relative position bias + shift mask equals a fresh computation and is
  invalidated when the table changes (optimizer step, load_state_dict);
* the 'auto', 'sdpa' and 'reference' attention paths agree (outputs and gradients, 1e-5), and
  'auto' dispatches as documented;
* in-place GELU / residual sums change nothing;
* a compiled model equals the eager one. Inductor needs minutes to compile even the demo model on
  a 2-core CPU, so the compile test uses the ``aot_eager`` backend (Dynamo tracing + AOTAutograd,
  the parts that see our Python) and inductor runs only with SWIN_TEST_INDUCTOR=1.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from models.build import build_model
from models.swin_transformer import (
    Mlp,
    SwinTransformerBlock,
    WindowAttention,
    gather_reverse_unshift,
    gather_shift_partition,
    shift_attention_mask,
    window_permutation,
)
from models.windows import roll_reverse_unshift as torch_reverse_unshift
from models.windows import roll_shift_partition as torch_shift_partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster, and far steadier when other jobs share the 2 cores
    (OpenMP regions then wait on a descheduled thread: 92 s for this file with 2 threads vs 28 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DEMO = os.path.join(ROOT, "configs", "demo", "swin_demo_digits.yaml")

# (B, H, W, C, M, s): Swin-T stage 1 geometry, non-square, no shift, shift > window / 2.
GEOMETRIES = [(2, 56, 56, 8, 7, 3), (2, 14, 21, 5, 7, 3), (3, 8, 12, 4, 4, 0), (1, 12, 8, 6, 4, 3)]


def _demo_model(attn_impl: str = "auto", **opts) -> torch.nn.Module:
    extra = ["MODEL.SWIN.ATTN_IMPL", attn_impl]
    for k, v in opts.items():
        extra += [k, str(v)]
    torch.manual_seed(0)
    model = build_model(get_config(DEMO, extra))
    with torch.no_grad():  # a non-trivial bias, so that a stale or wrong one shows
        for m in model.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias_table.normal_(0, 0.5)
    return model


def _set(model: torch.nn.Module, attn_impl=None, gather=None, cache=None) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, WindowAttention):
            if attn_impl is not None:
                m.attn_impl = attn_impl
            if cache is not None:
                m.cache_eval_bias = cache
        if isinstance(m, SwinTransformerBlock) and gather is not None:
            m.gather_partition = gather
    return model


def _family_model(family: str) -> torch.nn.Module:
    """The demo-sized V1 model (``_demo_model``) or a V2 of the same size, post-norms at one so
    that every branch contributes; in eval mode."""
    from models.swin_transformer_v2 import SwinTransformerV2

    if family == "v1":
        return _demo_model().eval()
    torch.manual_seed(0)
    model = SwinTransformerV2(
        img_size=32,
        patch_size=2,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=4,
        num_classes=10,
    ).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
    return model


def _uncached(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose attention modules build their bias afresh on every call."""
    copied = copy.deepcopy(model)
    for m in copied.modules():
        if hasattr(m, "cache_eval_bias"):
            m.cache_eval_bias = False
    return copied


# ---------------------------------------------------------------------------------------------
# Gather-based shift + partition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "B{}-{}x{}-C{}-M{}-s{}".format(*g))
def test_gather_partition_equals_roll_partition_forward_and_backward_exactly(geom):
    B, H, W, C, M, s = geom
    x = torch.randn(B, H, W, C, dtype=torch.float64)
    g = torch.randn(B * H * W // (M * M), M * M, C, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast = gather_shift_partition(xa, s, M)
    slow = torch_shift_partition(xb, s, M).reshape(-1, M * M, C)
    assert fast.shape == slow.shape and torch.equal(fast, slow)
    fast.backward(g)
    slow.backward(g)
    assert torch.equal(xa.grad, xb.grad)

    wa, wb = g.clone().requires_grad_(), g.clone().requires_grad_()
    back_fast = gather_reverse_unshift(wa, s, M, H, W)
    back_slow = torch_reverse_unshift(wb.view(-1, M, M, C), s, M, H, W)
    assert torch.equal(back_fast, back_slow)
    assert torch.equal(gather_reverse_unshift(fast, s, M, H, W), x)  # round trip
    back_fast.backward(x)
    back_slow.backward(x)
    assert torch.equal(wa.grad, wb.grad)


def test_gather_partition_double_backward_is_the_permutation_again():
    x = torch.randn(2, 14, 14, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_shift_partition(t, 3, 7), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_shift_partition(t, 3, 7) ** 2, (x,))


def test_permutation_is_a_permutation_and_cached():
    perm, inv = window_permutation(14, 21, 7, 3, torch.device("cpu"))
    assert torch.equal(perm.sort().values, torch.arange(14 * 21))
    assert torch.equal(perm[inv], torch.arange(14 * 21))
    assert window_permutation(14, 21, 7, 3, torch.device("cpu"))[0] is perm


@pytest.mark.parametrize("hw", [(14, 21), (15, 17)], ids=["multiple-of-window", "padded"])
def test_block_with_gather_equals_block_with_roll_exactly(hw):
    torch.manual_seed(1)
    fast = SwinTransformerBlock(dim=24, num_heads=3, window_size=7, shift_size=3, drop_path=0.0)
    slow = _set(copy.deepcopy(fast), gather=False)
    assert fast.gather_partition and not slow.gather_partition
    x = torch.randn(2, *hw, 24)
    outs, grads = [], []
    for blk in (fast, slow):
        xi = x.clone().requires_grad_()
        out = blk(xi)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in blk.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_permutation_built_under_inference_mode_serves_training():
    import models.windows as windows_module

    model = _demo_model(**{"MODEL.DROP_PATH_RATE": 0.0})
    reference = copy.deepcopy(model)
    # Fresh sizes, so the permutations and masks are first built inside inference_mode.
    x_odd = torch.randn(2, 3, 36, 44)
    windows_module._PERMUTATIONS.clear()
    with torch.inference_mode():
        model.eval()(x_odd)
    built = list(windows_module._PERMUTATIONS.values())
    assert built and not any(t.is_inference() for pair in built for t in pair)
    # Training reuses them (an inference tensor saved for backward would raise) with the same
    # gradients as a model whose permutations were built outside inference_mode.
    model.train()(x_odd).sum().backward()
    windows_module._PERMUTATIONS.clear()
    reference.train()(x_odd).sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[name].grad), name


# ---------------------------------------------------------------------------------------------
# Eval-mode bias cache
# ---------------------------------------------------------------------------------------------
def test_cached_eval_bias_equals_fresh_bias():
    attn = WindowAttention(dim=24, window_size=7, num_heads=3)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 0.5)
    mask = shift_attention_mask(14, 21, 7, 3)
    with torch.no_grad():
        # Training mode never caches, gradients or not (a fused step would leave no trace in the key).
        assert attn._attn_bias(mask, torch.float32) is not attn._attn_bias(mask, torch.float32)
        attn.eval()
        first = attn._attn_bias(mask, torch.float32)
        second = attn._attn_bias(mask, torch.float32)
        plain = attn._attn_bias(None, torch.float32)
    assert second is first  # served from the cache
    fresh = attn.relative_position_bias().unsqueeze(0) + mask.unsqueeze(1)
    assert torch.equal(first, fresh)
    assert torch.equal(plain, attn.relative_position_bias().unsqueeze(0))
    # With autograd on the bias is recomputed (it needs a graph), never cached.
    with torch.enable_grad():
        live = attn._attn_bias(mask, torch.float32)
    assert live is not first and live.requires_grad and torch.equal(live.detach(), fresh)


def test_a_mask_freed_and_replaced_at_its_address_by_another_is_not_served_the_old_bias():
    """A backbone run at many image sizes empties the mask cache; another size's mask of the same
    shape (here 2x4 windows of 4 against 4x2) may be allocated at the freed one's address. The
    cache entry holds the masks it was built from, so an address cannot come back while it lives."""
    attn = WindowAttention(dim=8, window_size=4, num_heads=2).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 0.5)
        for i in range(20):
            h, w = (8, 16) if i % 2 else (16, 8)
            mask = shift_attention_mask(h, w, 4, 2)
            got = attn._attn_bias(mask, torch.float32)
            torch.testing.assert_close(got, attn.relative_position_bias().unsqueeze(0) + mask.unsqueeze(1))
            del mask, got


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize(
    "impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["single", "foreach", "fused"]
)
def test_eval_cache_is_invalidated_by_an_optimizer_step_and_by_load_state_dict(family, impl):
    """Every AdamW implementation: torch's fused one updates the weights in place without bumping
    their versions (the cache's key), so a trainer's validations after the first would otherwise
    reuse the first one's bias."""
    model = _family_model(family)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    uncached = _uncached(model)

    # One optimizer step that moves only the attention's bias parameters (V1's tables, V2's MLP).
    model.train()
    bias_params = [p for n, p in model.named_parameters() if "relative_position_bias_table" in n or "cpb_mlp" in n]
    opt = torch.optim.AdamW(bias_params, lr=0.1, **impl)
    model(x).logsumexp(-1).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
        uncached.load_state_dict(model.state_dict())
        expected = uncached(x)
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, expected, atol=0, rtol=0)

    # Loading other weights invalidates it too.
    fresh = _family_model(family)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.01)
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh.eval()(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Attention paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 44], ids=["32x32", "44x44-padded"])
def test_auto_sdpa_and_reference_agree_in_eval_and_train(size):
    base = _demo_model("reference")
    x = torch.randn(3, 3, size, size)
    target = torch.randn(3, base.num_classes)
    outs, evals, grads = {}, {}, {}
    for impl in ("auto", "sdpa", "reference"):
        m = _set(copy.deepcopy(base), attn_impl=impl).train()
        torch.manual_seed(5)  # same drop-path draws
        out = m(x)
        (out * target).sum().backward()
        outs[impl] = out.detach()
        grads[impl] = {n: p.grad for n, p in m.named_parameters()}
        with torch.no_grad():
            evals[impl] = m.eval()(x)
    for impl in ("auto", "sdpa"):
        torch.testing.assert_close(outs[impl], outs["reference"], atol=1e-5, rtol=0)
        torch.testing.assert_close(evals[impl], evals["reference"], atol=1e-5, rtol=0)
        for n, g in grads[impl].items():
            scale = max(1.0, float(grads["reference"][n].abs().max()))
            torch.testing.assert_close(g, grads["reference"][n], atol=1e-5 * scale, rtol=0, msg=n)


def test_auto_uses_sdpa_for_cpu_inference_and_reference_for_cpu_training(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _demo_model("auto")
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert calls == []
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(calls) == sum(isinstance(m, WindowAttention) for m in model.modules())


def test_default_config_picks_auto():
    model = build_model(get_config(DEMO))
    assert {m.attn_impl for m in model.modules() if isinstance(m, WindowAttention)} == {"auto"}


# ---------------------------------------------------------------------------------------------
# In-place inference details
# ---------------------------------------------------------------------------------------------
def test_mlp_in_place_gelu_under_no_grad_equals_the_autograd_path():
    torch.manual_seed(2)
    mlp = Mlp(16, 64)
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        fast = mlp(x)
    slow = mlp(x)
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())
    assert torch.equal(fast, mlp.fc2(F.gelu(mlp.fc1(x))).detach())


def test_block_does_not_modify_its_input():
    blk = SwinTransformerBlock(dim=24, num_heads=3, window_size=7, shift_size=3)
    x = torch.randn(2, 14, 14, 24)
    keep = x.clone()
    with torch.no_grad():
        blk.eval()(x)
    blk.train()(x.requires_grad_()).sum().backward()
    assert torch.equal(x.detach(), keep)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def _compile_check(backend: str, scope: str = "model", checkpointing: bool = False) -> None:
    import torch._dynamo

    from models import compile_model

    torch._dynamo.reset()
    model = _demo_model(**{"MODEL.DROP_PATH_RATE": 0.0})
    model.set_grad_checkpointing(checkpointing)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    compiled = compile_model(model, scope, backend=backend)
    if scope == "model":
        assert compiled._orig_mod is model
    else:
        assert compiled is model and list(model.state_dict()) == keys  # checkpoints keep their keys
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), atol=1e-5, rtol=0)
    compiled.train()
    eager.train()
    torch.manual_seed(3)
    compiled(x).sum().backward()
    torch.manual_seed(3)
    eager(x).sum().backward()
    ref = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-5, rtol=1e-5, msg=n)
    torch._dynamo.reset()


def test_compiled_model_equals_eager_aot_eager_backend():
    _compile_check("aot_eager")


def test_block_by_block_compiled_model_equals_eager_under_grad_checkpointing_and_compiles_every_block(caplog):
    import logging

    import torch._dynamo

    counters = torch._dynamo.utils.counters
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        _compile_check("aot_eager", scope="blocks", checkpointing=True)
    # Every block variant got its own graph: none hit Dynamo's recompile limit and ran eager.
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    # Demo model: stages 1-2 with and without shift, stages 3-4 without; eval and train each.
    assert counters["stats"]["unique_graphs"] >= 12


def test_unknown_compile_scope_is_a_user_error():
    from errors import UserError
    from models import compile_model

    with pytest.raises(UserError, match="TRAIN.COMPILE_SCOPE is 'layers'; use one of blocks, model"):
        compile_model(_demo_model(), "layers")


@pytest.mark.skipif(
    os.environ.get("SWIN_TEST_INDUCTOR") != "1",
    reason="inductor takes ~85 s (forward) + ~170 s (train) to compile the demo model on this 2-core "
    "CPU, over this file's 60 s budget; set SWIN_TEST_INDUCTOR=1 to run it",
)
def test_compiled_model_equals_eager_inductor():
    _compile_check("inductor")


# ---------------------------------------------------------------------------------------------
# CUDA paths, checked on the CPU
# ---------------------------------------------------------------------------------------------
def test_folded_window_sdpa_accepts_the_layout_of_cudas_memory_efficient_kernel(monkeypatch):
    """CUDA's memory-efficient sdpa (every training step, and fp32) returns (B, H, N, d) in a
    (B, N, H, d) memory layout; the folded path used ``view`` on it and crashed."""
    from models.swin_transformer import sdpa_windows_folded

    real = F.scaled_dot_product_attention

    def efficient_layout(*args, **kwargs):
        out = real(*args, **kwargs)  # B, H, N, d
        strided = out.transpose(1, 2).contiguous().transpose(1, 2)
        assert not strided.is_contiguous()
        return strided

    monkeypatch.setattr(F, "scaled_dot_product_attention", efficient_layout)
    g = torch.Generator().manual_seed(0)
    B, nW, h, N, d = 2, 4, 3, 16, 8
    q, k, v = (torch.randn(B * nW, h, N, d, generator=g) for _ in range(3))
    bias = torch.randn(nW, h, N, N, generator=g)
    out = sdpa_windows_folded(q, k, v, bias, nW, 0.0, d**-0.5)
    per_window = bias.unsqueeze(0).expand(B, nW, h, N, N).reshape(B * nW, h, N, N)
    ref = torch.softmax(q @ k.transpose(-2, -1) * d**-0.5 + per_window, -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_a_block_keeps_an_fp32_residual_stream_under_autocast(family):
    """Under autocast the branches come out in bf16/fp16; the residual sum must stay fp32, as in
    the release and timm (an in-place add into the branch would store the stream in half)."""
    from models.swin_transformer_v2 import SwinTransformerBlockV2

    cls = SwinTransformerBlock if family == "v1" else SwinTransformerBlockV2
    torch.manual_seed(0)
    blk = cls(dim=24, num_heads=3, window_size=4, shift_size=2)
    if family == "v2":
        with torch.no_grad():  # post-norms start at zero: make the branches contribute
            for norm in (blk.norm1, blk.norm2):
                norm.weight.fill_(1.0)
    x = torch.randn(2, 8, 8, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, blk(x), atol=0.15, rtol=0.05)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_eval_cache_is_invalidated_by_a_dtype_change(family):
    """``.to(dtype)`` swaps the weights' storage without bumping their versions: the cached bias
    of the old dtype must not be served to the converted model."""
    model = _family_model(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # fills the cache in fp32
        model.double()  # new storage, same versions
        cached = model(x.double())
        uncached = _uncached(model)(x.double())
    assert cached.dtype == torch.float64
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_the_cuda_folded_window_path_equals_the_reference_on_the_cpu(monkeypatch, family):
    """The branch CUDA takes for shifted windows (windows folded into heads), forced on the CPU
    through the module's ``fold_windows`` switch."""
    import models.swin_transformer as v1
    import models.swin_transformer_v2 as v2
    from models.windows import shift_attention_mask

    torch.manual_seed(0)
    if family == "v1":
        ref = WindowAttention(16, 4, 2, attn_impl="reference")
        with torch.no_grad():
            ref.relative_position_bias_table.normal_(0, 0.5)
        fast = WindowAttention(16, 4, 2, attn_impl="sdpa")
    else:
        ref = v2.WindowAttentionV2(16, 4, 2, attn_impl="reference")
        fast = v2.WindowAttentionV2(16, 4, 2, attn_impl="sdpa")
    fast.load_state_dict(ref.state_dict())
    fast.fold_windows = True
    calls = []
    real = v1.sdpa_windows_folded

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (v1, v2):
        monkeypatch.setattr(module, "sdpa_windows_folded", spy)
    x = torch.randn(8, 16, 16)  # 2 images x 4 windows
    mask = shift_attention_mask(8, 8, 4, 2)
    torch.testing.assert_close(fast(x, mask), ref(x, mask), atol=1e-5, rtol=0)
    assert calls, "the folded path was not taken"
