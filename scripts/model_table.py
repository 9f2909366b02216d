"""Print the model tables as the code gives them (V1's Table 1, the V2 release's table): parameters,
GMACs and (optionally) throughput.

    python scripts/model_table.py                      # params and FLOPs (instant: 'meta' models)
    python scripts/model_table.py --throughput         # + forward images/s on the current device
    python scripts/model_table.py --throughput --batch-size 64 --models T S V2T8 --json table.json

Parameters and FLOPs (multiply-accumulates, the paper's "FLOPs") come from models built on the
'meta' device, so no memory is used. Throughput builds each model for real on the device (CUDA
when available, else CPU; ``--device`` overrides) and times eval-mode forward passes of random
images with ``timing.time_images_per_second``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from config import get_config, model_section  # noqa: E402
from models import build_model  # noqa: E402
from timing import SETTLE_PASSES, time_images_per_second  # noqa: E402

CFG = os.path.join(ROOT, "configs")
# (short name, label, config under configs/, release params, release GFLOPs (MACs), release V100 img/s)
# V1: the paper's Table 1 with the exact counts of the released code. V2: the release's model table
# (FLOPs as published, to one decimal; params exact, as the released code gives them).
VARIANTS = [
    ("T", "Swin-T", "swin/swin_tiny_patch4_window7_224.yaml", 28_288_354, 4.49, 755.2),
    ("S", "Swin-S", "swin/swin_small_patch4_window7_224.yaml", 49_606_258, 8.75, 436.9),
    ("B", "Swin-B", "swin/swin_base_patch4_window7_224.yaml", 87_768_224, 15.44, 278.1),
    ("B384", "Swin-B 384", "swin/swin_base_patch4_window12_384_finetune.yaml", 87_903_584, 47.1, 84.7),
    ("L", "Swin-L", "swin/swin_large_patch4_window7_224_22kto1k_finetune.yaml", 196_532_476, 34.49, 141.0),
    ("L384", "Swin-L 384", "swin/swin_large_patch4_window12_384_22kto1k_finetune.yaml", 196_735_516, 103.95, 42.1),
    ("V2T8", "SwinV2-T", "swinv2/swinv2_tiny_patch4_window8_256.yaml", 28_347_154, 5.9, 572.0),
    ("V2T16", "SwinV2-T", "swinv2/swinv2_tiny_patch4_window16_256.yaml", 28_347_154, 6.6, 437.0),
    ("V2S8", "SwinV2-S", "swinv2/swinv2_small_patch4_window8_256.yaml", 49_728_418, 11.5, 327.0),
    ("V2S16", "SwinV2-S", "swinv2/swinv2_small_patch4_window16_256.yaml", 49_728_418, 12.6, 257.0),
    ("V2B8", "SwinV2-B", "swinv2/swinv2_base_patch4_window8_256.yaml", 87_918_816, 20.3, 217.0),
    ("V2B16", "SwinV2-B", "swinv2/swinv2_base_patch4_window16_256.yaml", 87_918_816, 21.8, 174.0),
    (
        "V2B384",
        "SwinV2-B 384",
        "swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml",
        87_918_816,
        54.7,
        None,
    ),
    ("V2L16", "SwinV2-L", "swinv2/swinv2_large_patch4_window12to16_192to256_22kto1k_ft.yaml", 196_739_932, 47.5, None),
    (
        "V2L384",
        "SwinV2-L 384",
        "swinv2/swinv2_large_patch4_window12to24_192to384_22kto1k_ft.yaml",
        196_739_932,
        115.4,
        None,
    ),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=[v[0] for v in VARIANTS],
        choices=[v[0] for v in VARIANTS],
        help="which rows (default: all)",
    )
    p.add_argument("--throughput", action="store_true", help="also time forward passes on the device")
    p.add_argument("--batch-size", type=int, default=8, help="images per timed forward (default 8)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    p.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed forward passes, at least (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def _config(cfg_name: str):
    return get_config(os.path.join(CFG, cfg_name), ["MODEL.NUM_CLASSES", "1000"])


def measure_throughput(config, device: torch.device, batch_size: int, amp: bool, warmup: int, iters: int) -> float:
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(config)
    model.eval()
    size = config.DATA.IMG_SIZE
    images = torch.randn(batch_size, 3, size, size, device=device)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    @torch.inference_mode()
    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            return model(images)

    # On the CPU, a few more untimed batches until the page faults stop, as --throughput does.
    timing = time_images_per_second(step, batch_size, device, warmup=warmup, iters=iters, settle=SETTLE_PASSES)
    return timing.images_per_s


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    rows = []
    for short, label, cfg_name, paper_params, paper_gflops, paper_ips in VARIANTS:
        if short not in args.models:
            continue
        config = _config(cfg_name)
        with torch.device("meta"):
            model = build_model(config)
        params = sum(p.numel() for p in model.parameters())
        row = {
            "model": label,
            "config": cfg_name,
            "img_size": config.DATA.IMG_SIZE,
            "window": model_section(config).WINDOW_SIZE,
            "params": params,
            "gmacs": model.flops() / 1e9,
            "paper_params": paper_params,
            "paper_gflops": paper_gflops,
            "paper_v100_img_s": paper_ips,
        }
        if args.throughput:
            row["img_s"] = measure_throughput(config, device, args.batch_size, args.amp, args.warmup, args.iters)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model measured is gone: hand its memory back before the next
            row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            row["batch_size"] = args.batch_size
            row["amp"] = args.amp
        rows.append(row)
        print_row(row, header=len(rows) == 1, throughput=args.throughput)
    if args.throughput and rows:
        print(
            f"\nthroughput: eval forward, batch {args.batch_size}, {'AMP' if args.amp else 'fp32'}, "
            f"on {rows[0]['device']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


def print_row(row: dict, header: bool, throughput: bool) -> None:
    cols = f"{'model':<13} {'size':>4} {'M':>3} {'params':>12} {'paper':>12} {'GMACs':>8} {'paper':>7}"
    if throughput:
        cols += f" {'img/s':>9} {'V100 paper':>10}"
    if header:
        print(cols)
        print("-" * len(cols))
    line = (
        f"{row['model']:<13} {row['img_size']:>4} {row['window']:>3} {row['params']:>12,} {row['paper_params']:>12,} "
        f"{row['gmacs']:>8.2f} {row['paper_gflops']:>7.2f}"
    )
    if throughput:
        paper = row["paper_v100_img_s"]
        line += f" {row['img_s']:>9.1f} " + (f"{paper:>10.1f}" if paper is not None else f"{'-':>10}")
    print(line, flush=True)


if __name__ == "__main__":
    main()
