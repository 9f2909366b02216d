"""Export a checkpoint's weights as safetensors (no pickle: loading it can never run code).

    python scripts/export.py output/swin_demo_digits/demo/best.pth --out swin_demo.safetensors

The file carries the model weights plus, as metadata, the config (YAML text) and the class names,
so ``--pretrained swin_demo.safetensors`` and ``scripts/predict.py`` work from it alone. V1 and V2
checkpoints alike: buffers derived from the window (``relative_position_index``, V2's
``relative_coords_table``, ``attn_mask``) are left out, as every loader rebuilds them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

from checkpoint import load_checkpoint_file  # noqa: E402
from errors import report_user_errors  # noqa: E402
from models.pretrained import DERIVED_KEYS, extract_state_dict  # noqa: E402


def export(checkpoint_path: str, out_path: str) -> int:
    """Write ``checkpoint_path``'s weights to ``out_path``; returns the number of tensors."""
    checkpoint = load_checkpoint_file(checkpoint_path)
    state = {
        k: v.contiguous() for k, v in extract_state_dict(checkpoint).items() if k.rsplit(".", 1)[-1] not in DERIVED_KEYS
    }
    meta = {"format": "pt"}
    if isinstance(checkpoint.get("config"), str):
        meta["config"] = checkpoint["config"]
    if checkpoint.get("class_names"):
        meta["class_names"] = json.dumps(list(checkpoint["class_names"]))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(state, out_path, metadata=meta)
    return len(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pth checkpoint written by main.py (or a released one)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print("error: --out must end in .safetensors", file=sys.stderr)
        return 2
    return report_user_errors(lambda: print(f"wrote {export(args.checkpoint, args.out)} tensors to {args.out}"))


if __name__ == "__main__":
    sys.exit(main())
