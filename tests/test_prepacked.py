"""models/prepacked.py: linear layers with weights reordered once for oneDNN, used by eager fp32
and bf16-autocast inference on the CPU (--eval, --throughput, predict) — the same logits, the same
state dict, and the plain linear wherever the packed call would be wrong (gradients, fp16
autocast, other dtypes)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import inference
from distributed import Precision
from models.prepacked import PrepackedLinear, prepack_available, prepack_linears
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch has no oneDNN linear")
CPU = torch.device("cpu")


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    if family == "v1":
        model = SwinTransformer(num_classes=7, **kwargs)
    else:
        model = SwinTransformerV2(num_classes=7, pretrained_window_sizes=(0, 0), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_a_prepacked_model_gives_the_same_logits_and_keeps_its_state_dict(family):
    model = tiny(family)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.head._packed is not None  # the classifier took the packed call


def test_the_packed_weight_follows_an_in_place_change_of_the_weights():
    layer = nn.Linear(6, 5).eval()
    packed = PrepackedLinear(layer)
    x = torch.randn(4, 6)
    with torch.no_grad():
        packed(x)
        assert packed._packed is not None
        layer.weight.mul_(-2.0)  # e.g. load_state_dict after packing
        layer.bias.add_(1.0)
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_after_a_fused_optimizer_step_and_eval_the_packed_weight_is_the_new_one():
    """torch's fused AdamW updates the weight in place without bumping its version (the packed
    copy's key): switching to eval mode, as every evaluation does, repacks."""
    layer = nn.Linear(6, 5)
    packed = PrepackedLinear(layer).eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        packed(x)
    packed.train()
    packed(x).square().sum().backward()
    torch.optim.AdamW(packed.parameters(), lr=0.1, fused=True).step()
    packed.eval()
    with torch.no_grad():
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_training_mode_takes_the_plain_linear_even_without_gradients():
    """A forward under no_grad between fused optimizer steps (a teacher, a logging pass) would
    otherwise reuse a weight packed before the steps: fused steps leave the version as it was."""
    packed = PrepackedLinear(nn.Linear(6, 5))  # a fresh layer is in training mode, and so is this
    with torch.no_grad():
        packed(torch.randn(4, 6))
    assert packed.training and packed._packed is None


def test_weights_put_in_by_an_assigning_load_are_packed_afresh():
    """load_state_dict(assign=True) swaps in new tensors at version 0, which the allocator may
    place at the freed address of the old ones; the packed copy holds the old storage, so the
    key cannot be matched by the new weights."""
    torch.manual_seed(0)
    packed = PrepackedLinear(nn.Linear(64, 32).eval())
    x = torch.randn(4, 64)
    for _ in range(20):
        with torch.no_grad():
            packed(x)
        # Two loads between forwards: the second's tensors may take the packed weight's address.
        for _ in range(2):
            state = {"weight": torch.randn(32, 64), "bias": torch.randn(32)}
            packed.load_state_dict(state, assign=True)
            del state
        with torch.no_grad():
            torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, packed.weight, packed.bias))


def test_gradients_and_other_dtypes_take_the_plain_linear():  # bf16 autocast: test_under_bf16_autocast_...
    torch.manual_seed(1)
    layer = nn.Linear(6, 5)
    packed = PrepackedLinear(copy.deepcopy(layer)).eval()
    x = torch.randn(4, 6, requires_grad=True)
    packed(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    layer(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(packed.weight.grad, layer.weight.grad)
    assert packed._packed is None  # never packed: every call had gradients

    # A float32 input to float32 weights packs; a bf16 input to them does not (F.linear's own rules apply).
    with torch.no_grad():
        half = x.detach().to(torch.bfloat16)
        with pytest.raises(RuntimeError):
            packed(half)
        assert packed._packed is None
        packed(x.detach())
    assert packed._packed is not None


def test_a_prepacked_model_copies_and_pickles_without_its_packed_weights():
    model = tiny("v1")
    prepack_linears(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.head._packed is None
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), expected)


def test_eager_cpu_inference_prepacks_in_fp32_and_under_bf16_autocast_but_not_fp16():
    fp32, _ = inference.inference_model(tiny("v1"), CPU, Precision(CPU, None, "float32"), compile=False)
    assert isinstance(fp32.head, PrepackedLinear)
    bf16, _ = inference.inference_model(tiny("v1"), CPU, Precision(CPU, torch.bfloat16, "bf16 autocast"), False)
    assert isinstance(bf16.head, PrepackedLinear) and bf16.head.weight.dtype == torch.float32
    fp16, _ = inference.inference_model(tiny("v1"), CPU, Precision(CPU, torch.float16, "fp16 autocast"), False)
    assert type(fp16.head) is nn.Linear


def test_under_bf16_autocast_the_packed_product_gives_autocasts_bits_from_a_bf16_copy_packed_once():
    """Autocast would cast input, weight and bias to bf16 and multiply: the packed layer does the
    same with its weight cast and packed once (where this CPU packs bf16; else it is F.linear)."""
    torch.manual_seed(0)
    for n_in, n_out, rows in ((96, 288, 3136), (384, 96, 784), (768, 1000, 16)):
        plain = nn.Linear(n_in, n_out).eval()
        packed = PrepackedLinear(plain)
        x = torch.randn(rows, n_in)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = plain(x), packed(x)
            key = packed._packed_from
            packed(x)
        assert got.dtype == expected.dtype == torch.bfloat16 and torch.equal(got, expected), (n_in, n_out)
        assert key[3] == torch.bfloat16 and packed._packed_from == key  # packed once, as bf16
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):  # no fp16 packing
        assert torch.equal(packed(x), plain(x))


def test_a_model_cast_to_bf16_after_packing_repacks_in_bf16_and_agrees_with_its_plain_copy():
    model = tiny("v1")
    plain = copy.deepcopy(model).to(torch.bfloat16)
    prepack_linears(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)  # packed in float32 first
        model.to(torch.bfloat16)
        got, expected = model(x.to(torch.bfloat16)), plain(x.to(torch.bfloat16))
    assert model.head._packed_from[2] == torch.bfloat16  # packed again, or refused (None) on this CPU
    # oneDNN and the plain path may round bf16 sums differently: within bf16's error of the logits.
    assert float((got.float() - expected.float()).abs().max()) <= 0.03 * float(expected.float().abs().max())


def test_a_weight_onednn_refuses_to_pack_runs_as_a_plain_linear(monkeypatch):
    import models.prepacked as prepacked

    def refuse(weight):
        calls.append(weight.dtype)
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support ...")

    calls = []
    monkeypatch.setattr(prepacked, "reorder_weight", refuse)
    layer = nn.Linear(6, 5).eval()
    packed = PrepackedLinear(layer)
    x = torch.randn(4, 6)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(packed(x), layer(x))
    assert calls == [torch.float32]  # tried once, not per call
