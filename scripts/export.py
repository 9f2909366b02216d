"""Export a checkpoint's weights as safetensors or a plain weights file, in the release's or timm's layout.

    python scripts/export.py output/swin_demo_digits/demo/best.pth --out swin_demo.safetensors
    python scripts/export.py best.pth --out swin_tiny_timm.pth --layout timm    # timm's model.load_state_dict
    python scripts/export.py best.pth --out swin_tiny.onnx [--img-size 224]     # ONNX, checked by onnxruntime
    python scripts/export.py swin_tiny_patch4_window7_224.pth --cfg configs/swin_tiny.yaml --out swin_tiny.onnx
    python scripts/export.py output/swin_large/run/ckpt_epoch_89.dcp --out swin_large.pth  # an --fsdp folder

``.safetensors`` (no pickle: loading it can never run code) carries the weights plus, as metadata,
the config (YAML text) and the class names, so ``--pretrained swin_demo.safetensors`` and
``scripts/predict.py`` work from it alone (from an official training checkpoint, the yacs config
it carries is exported as YAML). ``.pth`` holds ``{'model': weights}`` in the release's layout
(what the official code's ``--pretrained``/``--resume`` read), or with ``--layout timm`` timm's
bare state dict (merging at the start of the next stage, ``head.fc``), which timm's
``swin_*``/``swinv2_*`` models load strictly. V1 and V2 alike: buffers derived from the window
(``relative_position_index``, V2's ``relative_coords_table``, ``attn_mask``) are left out, as
every loader rebuilds them. A sharded checkpoint folder of an ``--fsdp`` run is gathered whole in
this one process, without a process group (``checkpoint.load_checkpoint_file`` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from checkpoint import load_checkpoint_file  # noqa: E402
from errors import UserError, report_user_errors  # noqa: E402
from models.layouts import from_official, to_official  # noqa: E402
from models.onnx_export import EXPORTERS  # noqa: E402
from models.pretrained import DERIVED_KEYS, extract_state_dict  # noqa: E402


def export_to_onnx(
    checkpoint_path: str,
    out_path: str,
    img_size: int | None = None,
    exporter: str = "auto",
    cfg: str | None = None,
    opts: list[str] | None = None,
) -> tuple[float, str]:
    """The checkpoint's classifier as ONNX at ``img_size`` (default: its DATA.IMG_SIZE) by
    ``exporter``, verified by onnxruntime; returns the max logit difference and the exporter used.
    ``cfg``/``opts``: the config to build it with, for a checkpoint that stores none (released
    weights) or to override the stored one."""
    from config import config_for_checkpoint, require_classifier
    from models import build_model, load_weights
    from models.onnx_export import export_onnx, verify_onnx

    checkpoint = load_checkpoint_file(checkpoint_path)
    config = config_for_checkpoint(checkpoint, cfg, opts, source=checkpoint_path)
    require_classifier(config, checkpoint_path)
    if img_size:
        config = config.clone()
        config.defrost()
        config.DATA.IMG_SIZE = int(img_size)
        config.freeze()
    model = build_model(config)
    load_weights(model, checkpoint, "inference", name=checkpoint_path)
    size = int(config.DATA.IMG_SIZE)
    used = export_onnx(model, out_path, size, exporter=exporter)
    return verify_onnx(model, out_path, size), used


def export(checkpoint_path: str, out_path: str, layout: str = "official") -> int:
    """Write ``checkpoint_path``'s weights to ``out_path`` (``.safetensors`` or ``.pth``) in
    ``layout`` ('official' or 'timm'); returns the number of tensors."""
    if not out_path.endswith((".safetensors", ".pth", ".pt")):
        raise UserError(f"--out {out_path} must end in .safetensors, .pth or .onnx")
    checkpoint = load_checkpoint_file(checkpoint_path)
    state = {
        k: v.contiguous() for k, v in extract_state_dict(checkpoint).items() if k.rsplit(".", 1)[-1] not in DERIVED_KEYS
    }
    if any(k.startswith("encoder.") for k in state):
        # SimMIM pre-training (encoder.*, decoder.*): the release's own layout, kept as it is;
        # --pretrained reads it for fine-tuning. timm has no such model.
        if layout != "official":
            raise UserError(
                f"{checkpoint_path} is a SimMIM pre-training checkpoint; timm has no SimMIM model: export "
                "--layout official (--pretrained reads it), or fine-tune it first"
            )
    else:
        state = to_official(state)
        if layout == "timm" and "absolute_pos_embed" in state:
            raise UserError(
                f"{checkpoint_path} has an absolute position embedding (MODEL.SWIN.APE), which timm's Swin "
                "models lack; export --layout official"
            )
        state = from_official(state, layout)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not out_path.endswith(".safetensors"):
        # timm's models load a bare state dict; the release's code reads the 'model' entry.
        torch.save(state if layout == "timm" else {"model": state}, out_path)
        return len(state)
    meta = {"format": "pt", "layout": layout}
    if isinstance(checkpoint.get("config"), str):
        meta["config"] = checkpoint["config"]
    if checkpoint.get("class_names"):
        meta["class_names"] = json.dumps(list(checkpoint["class_names"]))
    save_file(state, out_path, metadata=meta)
    return len(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint",
        help="a .pth checkpoint written by main.py (or released weights, or an official training checkpoint), "
        "or a sharded checkpoint folder (.dcp) of an --fsdp run",
    )
    p.add_argument("--out", required=True, help="the file to write: .safetensors, .pth or .onnx")
    p.add_argument(
        "--layout", choices=["official", "timm"], default="official", help="key layout to write (default: official)"
    )
    p.add_argument("--img-size", type=int, help="ONNX only: the input size to export (default: the checkpoint's)")
    p.add_argument(
        "--cfg",
        metavar="FILE",
        help="ONNX only: the config that builds the model, for a checkpoint that stores none (released weights)",
    )
    p.add_argument("--opts", nargs="+", metavar="KEY VALUE", help="ONNX only: config keys to override")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="ONNX only: torch's torch.export-based exporter (dynamo), the deprecated TorchScript one, or "
        "auto: dynamo, falling back to TorchScript where it is missing or fails (default: auto)",
    )
    args = p.parse_args(argv)

    def run() -> None:
        if args.out.endswith(".onnx"):
            diff, used = export_to_onnx(args.checkpoint, args.out, args.img_size, args.exporter, args.cfg, args.opts)
            sys.stdout.write(
                f"wrote {args.out} ({used} exporter); onnxruntime's logits within {diff:.1e} of PyTorch's\n"
            )
            return
        n = export(args.checkpoint, args.out, args.layout)
        sys.stdout.write(f"wrote {n} tensors ({args.layout} layout) to {args.out}\n")

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
