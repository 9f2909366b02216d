"""ONNX export (issue "Speed on every machine", item 4): V1 and V2 classifiers export with the
shift as a gather (no ``roll``), any batch size, and onnxruntime gives PyTorch's logits."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import export as export_script  # noqa: E402

from checkpoint import config_yaml  # noqa: E402
from config import get_config  # noqa: E402
from models import build_model  # noqa: E402
from models.onnx_export import onnxruntime_session  # noqa: E402

TINY = {
    "swin": ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.NUM_HEADS", "[1,2,4,8]", "MODEL.NUM_CLASSES", "10"],
    "swinv2": ["MODEL.SWINV2.EMBED_DIM", "16", "MODEL.SWINV2.NUM_HEADS", "[1,2,4,8]", "MODEL.NUM_CLASSES", "10"],
}
DEMO = {"swin": "swin_demo_digits.yaml", "swinv2": "swinv2_demo_digits.yaml"}


def _checkpoint(family: str, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    config = get_config(str(ROOT / "configs" / "demo" / DEMO[family]), TINY[family])
    torch.manual_seed(0)
    model = build_model(config)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "config": config_yaml(config)}, ckpt)
    return ckpt, model


# auto is torch's torch.export-based exporter (onnxscript is installed); the TorchScript one is
# what auto falls back to.
# The torch.export-based exporter takes ~20 s a model here; the TorchScript one ~2 s.
@pytest.mark.parametrize(
    "family,exporter",
    [
        pytest.param("swin", "auto", marks=pytest.mark.slow),
        pytest.param("swinv2", "auto", marks=pytest.mark.slow),
        ("swinv2", "torchscript"),
    ],
)
def test_a_checkpoint_exports_to_onnx_and_onnxruntime_gives_pytorchs_logits(family, exporter, tmp_path, capsys):
    ckpt, model = _checkpoint(family, tmp_path)
    out = tmp_path / "model.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_script.main([str(ckpt), "--out", str(out), "--exporter", exporter]) == 0
    # The shape branches the tracer would warn about are constants of the export (fixed size), and
    # neither exporter leaves torch's deprecation notice for the other.
    assert not [w for w in caught if issubclass(w.category, (torch.jit.TracerWarning, DeprecationWarning))]
    line = capsys.readouterr().out
    used = "dynamo" if exporter == "auto" else exporter
    assert f"({used} exporter); onnxruntime's logits within" in line
    assert float(line.rsplit("within ", 1)[1].split(" ")[0]) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pth"]  # weights inside, no .data
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert "Gather" in ops and not any("Roll" in op for op in ops)  # the shift is a gather
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # any batch size, one image too
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images).numpy()
    got = onnxruntime_session(str(out)).run(None, {"images": images.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


def test_auto_falls_back_to_the_torchscript_exporter_with_the_reason_and_dynamo_alone_fails_in_one_line(
    tmp_path, capsys, caplog, monkeypatch
):
    ckpt, _ = _checkpoint("swin", tmp_path)
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("Failed to export the model with torch.export.\nmore detail")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    out = tmp_path / "model.onnx"
    assert export_script.main([str(ckpt), "--out", str(out)]) == 0
    assert "(torchscript exporter); onnxruntime's logits within" in capsys.readouterr().out
    assert (
        "ONNX: the torch.export-based exporter failed (RuntimeError: Failed to export the model with torch.export.)"
        in caplog.text
    )
    assert export_script.main([str(ckpt), "--out", str(out), "--exporter", "dynamo"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: the torch.export-based ONNX exporter failed (RuntimeError: Failed to export the model with "
        "torch.export.); try --exporter torchscript\n"
    )


def test_onnx_export_at_another_size_and_a_bad_suffix_are_handled(tmp_path, capsys):
    # V2: its continuous position bias serves any window, so the model exports at a new size as is.
    ckpt, _ = _checkpoint("swinv2", tmp_path)
    args = [str(ckpt), "--out", str(tmp_path / "m48.onnx"), "--img-size", "48", "--exporter", "torchscript"]
    assert export_script.main(args) == 0
    graph = onnx.load(str(tmp_path / "m48.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 48, 48]
    capsys.readouterr()
    assert export_script.main([str(ckpt), "--out", str(tmp_path / "m.bin")]) == 2
    assert "must end in .safetensors, .pth or .onnx" in capsys.readouterr().err


def test_the_benchmark_times_onnxruntime_beside_ours_and_timm(tmp_path):
    import json
    import subprocess

    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "demo", "--dtypes", "fp32"]
        + ["--modes", "eager", "--rounds", "1", "--iters", "1", "--onnxruntime", "--json", str(out)]
        + ["--onnx-exporter", "torchscript"],  # the quicker writer; both exporters are tested above
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"] if r["phase"] == "forward"}
    # Each row's bound comes from the higher of the fp32 peaks measured before and after the rows.
    machine = result["machine"]
    peak = machine["matmul_peak_gflops"]["fp32"]
    assert peak >= machine["matmul_peak_gflops_before_rows"]["fp32"] > 0
    assert rows["ours"]["bound_img_s"] == pytest.approx(peak / machine["gflop_per_forward"])
    from models.prepacked import prepack_available

    # the CPU's fp32 eager row also times the inference commands' fast path where oneDNN packs
    assert set(rows) == {"ours", "onnxruntime"} | ({"fast path"} if prepack_available() else set())
    assert rows["onnxruntime"]["ours_img_s"] > 0 and rows["onnxruntime"]["timm_img_s"] > 0
    assert rows["onnxruntime"]["ours_note"] == "our model as ONNX (torchscript exporter)"
    assert "onnxruntime" in done.stdout
    # Before the rounds, the CPU rows settled: at least one untimed pass, at most --settle's 5.
    assert all(1 <= r["settle_passes"] <= 5 for r in rows.values()), rows


def test_released_weights_without_a_config_export_with_cfg_and_a_simmim_checkpoint_is_refused_in_one_line(
    tmp_path, capsys
):
    """Released weights store no config: --cfg (with --opts) builds the model, as the error says.
    A SimMIM pre-training checkpoint has no classifier to export: one line, no traceback."""
    config = get_config(str(ROOT / "configs" / "demo" / DEMO["swin"]), TINY["swin"])
    torch.manual_seed(0)
    bare = tmp_path / "released.pth"
    torch.save({"model": build_model(config).state_dict()}, bare)
    out = str(tmp_path / "m.onnx")
    assert export_script.main([str(bare), "--out", out, "--exporter", "torchscript"]) == 2
    assert "stores no config; pass --cfg" in capsys.readouterr().err
    cfg = ["--cfg", str(ROOT / "configs" / "demo" / DEMO["swin"]), "--opts", *TINY["swin"]]
    assert export_script.main([str(bare), "--out", out, "--exporter", "torchscript", *cfg]) == 0
    assert "onnxruntime's logits within" in capsys.readouterr().out

    simmim = get_config(str(ROOT / "configs" / "demo" / "simmim_demo_digits.yaml"), TINY["swin"][:4])
    pt = tmp_path / "simmim.pth"
    torch.save({"model": build_model(simmim).state_dict(), "config": config_yaml(simmim)}, pt)
    assert export_script.main([str(pt), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a SimMIM pre-training model, with no classifier; fine-tune it first" in err
    # Its weights export as they are (the release's SimMIM layout, which --pretrained reads); timm has no SimMIM.
    assert export_script.main([str(pt), "--out", str(tmp_path / "pt.safetensors")]) == 0
    assert export_script.main([str(pt), "--out", str(tmp_path / "pt_timm.pth"), "--layout", "timm"]) == 2
    assert "timm has no SimMIM model" in capsys.readouterr().err
    from safetensors.torch import load_file

    from models.pretrained import load_pretrained

    saved = load_file(str(tmp_path / "pt.safetensors"))
    assert "encoder.mask_token" in saved and "decoder.0.weight" in saved
    classifier = build_model(config)
    report = load_pretrained(classifier, str(tmp_path / "pt.safetensors"))
    assert report.missing == [] and "decoder.0.weight" in report.dropped
