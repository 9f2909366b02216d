"""scripts/benchmark.py's limits (issue "Speed on every machine", item 5): the matmul peak measured
in the run, the instruction sets named, and each row set against its bound."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


def test_the_matmul_peak_is_a_positive_rate_measured_for_the_time_asked():
    assert benchmark.matmul_peak_gflops(torch.device("cpu"), torch.float32, seconds=0.05) > 1.0


def test_the_matmul_peak_is_the_fastest_product_so_slow_moments_do_not_lower_it(monkeypatch):
    import time

    calls = []

    def mm(a, b):  # every other product stalls, as on a busy VM
        calls.append(1)
        time.sleep(0.002 if len(calls) % 2 else 0.04)
        return a

    monkeypatch.setattr(benchmark.torch, "mm", mm)
    gflops = benchmark.matmul_peak_gflops(torch.device("cpu"), torch.float32, seconds=0.2)
    fast = 2.0 * 2048**3 / 0.002 / 1e9  # a product timed at the 2 ms of the quick calls
    assert len(calls) > 4 and fast / 4 < gflops <= fast * 1.01  # the mean would be about fast / 10


def test_rows_are_set_against_the_higher_of_the_peaks_measured_before_and_after_them():
    before, after = {"fp32": 141.0, "bf16": 415.0}, {"fp32": 182.0, "bf16": 360.0}
    assert benchmark.higher_peaks(before, after) == {"fp32": 182.0, "bf16": 415.0}
    emulated = {"fp32": 150.0, "bf16": None}
    assert benchmark.higher_peaks(emulated, {"fp32": 120.0, "bf16": None}) == {"fp32": 150.0, "bf16": None}


def test_the_isa_line_names_each_instruction_set_present_or_not():
    line = benchmark.isa_line({"avx2": True, "avx512f": True, "avx512_bf16": False, "amx": False})
    assert line == "AVX2 yes, AVX-512 yes, AVX-512 BF16 no, AMX no"


def test_a_row_is_shown_as_its_share_of_the_bound_and_emulated_bf16_as_not_applicable():
    assert benchmark.bound_text({"fraction_of_bound": 0.614, "bound_img_s": 45.0, "dtype": "bf16"}) == "61 %"
    assert benchmark.bound_text({"fraction_of_bound": None, "bound_img_s": None, "dtype": "bf16"}) == "n/a (emul.)"
    assert benchmark.bound_text({"fraction_of_bound": None, "bound_img_s": 20.0, "dtype": "fp32"}) == "-"


def test_auto_malloc_keeps_freed_memory_on_the_cpu_as_the_trainer_and_inference_commands_do():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert benchmark.malloc_keeps("auto", cpu) is True
    assert benchmark.malloc_keeps("auto", cuda) is False
    assert benchmark.malloc_keeps("keep", cuda) is True
    assert benchmark.malloc_keeps("default", cpu) is False
    assert benchmark.parse_args([]).malloc == "auto"


def test_top_kernels_ranks_the_operations_of_one_step_by_self_time():
    # 512²: four products take milliseconds, so nothing else the process does in that window (once
    # in a full suite run, an aten::_to_copy outranked four 256² products) can come first.
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def step():
        for _ in range(4):
            a @ b
        a.add(1.0)

    top = benchmark.top_kernels(step, torch.device("cpu"), 2)
    assert len(top) == 2
    assert top[0]["name"] in ("aten::mm", "aten::matmul") and top[0]["calls"] == 4
    assert top[0]["ms"] >= top[1]["ms"] > 0


def test_every_lever_is_a_switch_of_the_model_copy_and_leaves_the_original_alone():
    from models.swin_transformer import SwinTransformer, WindowAttention

    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    for name, switches in benchmark.FORWARD_LEVERS.items():
        copy = benchmark.variant(model, **switches)
        attn = next(m for m in copy.modules() if isinstance(m, WindowAttention))
        assert attn.fold_windows is switches.get("fold"), name
        assert attn.attn_impl == switches.get("attn_impl", "auto"), name
    assert all(m.fold_windows is None for m in model.modules() if isinstance(m, WindowAttention))
    from models.prepacked import PrepackedLinear

    packed = benchmark.variant(model, **benchmark.FORWARD_LEVERS["prepacked linears"])
    assert isinstance(packed.head, PrepackedLinear) and type(model.head) is torch.nn.Linear
    from models.windows import MASK_VALUE, UNDERFLOW_MASK_VALUE

    released = benchmark.variant(model, **benchmark.FORWARD_LEVERS["release mask"])
    shifted = released.layers[0].blocks[1]
    assert shifted.mask_value == MASK_VALUE and model.layers[0].blocks[1].mask_value == UNDERFLOW_MASK_VALUE
    assert float(shifted.attention_mask(8, 8, torch.device("cpu")).min()) == MASK_VALUE


def test_the_fast_path_row_times_a_copy_as_the_inference_commands_build_it():
    from models.prepacked import PrepackedLinear, prepack_available
    from models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    x = torch.randn(2, 3, 32, 32)
    for dtype in (None, torch.bfloat16):  # fp32, bf16 autocast
        amp = benchmark.autocast(torch.device("cpu"), dtype)
        with torch.inference_mode(), amp:
            expected = model.eval()(x)
        fast = benchmark.fast_path_model(model, dtype)
        if not prepack_available():
            assert fast is None  # nothing would change
            continue
        assert isinstance(fast.head, PrepackedLinear) and fast.head.weight.dtype == torch.float32
        with torch.inference_mode(), amp:
            got = fast(x)
        # fp32: oneDNN's product within float error; bf16 autocast: autocast's own bits.
        torch.testing.assert_close(got, expected, atol=1e-5 if dtype is None else 0, rtol=0)
    # The timed model is a copy: the original keeps its nn.Linear layers.
    assert type(model.head) is torch.nn.Linear


def test_a_model_compiled_again_for_the_next_mode_is_traced_afresh_not_served_the_last_modes_graph():
    traced = []

    def backend(gm, example_inputs):  # counts the graphs Dynamo hands to a compiler
        traced.append(gm)
        return gm.forward

    model, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    torch.compile(model, backend=backend)(x)
    torch.compile(model, backend=backend)(x)  # a second wrapper of the same module ...
    assert len(traced) == 1  # ... reuses the first graph: the frozen row once timed the compiled one
    benchmark.forget_compiled_graphs()
    torch.compile(model, backend=backend)(x)
    assert len(traced) == 2
    benchmark.forget_compiled_graphs()  # leave no graph of nn.Linear behind for other tests
