"""Draw a training run's curves into one PNG: loss, learning rate and gradient norm per step,
validation Acc@1 / Acc@5 per epoch.

    python scripts/plot_logs.py OUTPUT_DIR [--out PNG]

OUTPUT_DIR is a run folder of ``main.py`` (OUTPUT/MODEL.NAME/TAG) or any folder above a single
run. The scalars come from the TensorBoard event files ``main.py`` writes under
``OUTPUT_DIR/tensorboard`` (train/loss, train/lr, train/grad_norm, val/acc1, val/acc5); without
event files the ``log_rank0.txt`` lines are parsed instead. Default output: OUTPUT_DIR/curves.png.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from errors import UserError, report_user_errors  # noqa: E402

Series = list[tuple[float, float]]  # (step or epoch, value), sorted by the first
TAGS = ("train/loss", "train/lr", "train/grad_norm", "val/acc1", "val/acc5")
LOG_NAME = "log_rank0.txt"
_EVENT_PREFIX = "events.out.tfevents"


def _dirs_with(root: str, match) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(match(f) for f in filenames):
            found.append(dirpath)
    return found


def _single(dirs: list[str], what: str, root: str) -> str | None:
    if not dirs:
        return None
    if len(dirs) > 1:
        shown = ", ".join(os.path.relpath(d, root) for d in dirs[:4])
        raise UserError(f"{root} holds {what} of {len(dirs)} runs ({shown}); pass one run's folder")
    return dirs[0]


def _sorted_unique(points: dict[float, float]) -> Series:
    return sorted(points.items())


def read_event_scalars(output_dir: str) -> dict[str, Series]:
    """Scalars of the run's TensorBoard event files (all files of its folder; a later value at the
    same step, from a resumed run, wins). Empty when there are no event files."""
    folder = _single(_dirs_with(output_dir, lambda f: f.startswith(_EVENT_PREFIX)), "TensorBoard logs", output_dir)
    if folder is None:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(folder, size_guidance={SCALARS: 0})  # 0 = keep every point
    acc.Reload()
    available = set(acc.Tags().get("scalars", []))
    out: dict[str, Series] = {}
    for tag in TAGS:
        if tag in available:
            points: dict[float, float] = {}
            for event in acc.Scalars(tag):
                points[float(event.step)] = float(event.value)
            out[tag] = _sorted_unique(points)
    return out


_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_TRAIN_RE = re.compile(
    r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\].*?\blr " + _NUM + r".*?\bloss " + _NUM + r" \(.*?\bgrad_norm " + _NUM
)
_VAL_RE = re.compile(r"\* Acc@1 " + _NUM + r" Acc@5 " + _NUM)


def parse_log(path: str) -> dict[str, Series]:
    """Scalars from ``log_rank0.txt``: the 'Train: [epoch/E][i/N] ... lr ... loss v (avg) ...
    grad_norm v (avg)' lines (step = epoch·N + i + 1, as the trainer counts optimizer steps without
    accumulation) and the ' * Acc@1 a Acc@5 b' line that ends each epoch's validation."""
    series: dict[str, dict[float, float]] = {tag: {} for tag in TAGS}
    epoch: int | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _TRAIN_RE.search(line)
            if m:
                epoch, idx, n = int(m.group(1)), int(m.group(2)), int(m.group(3))
                step = float(epoch * n + idx + 1)
                series["train/lr"][step] = float(m.group(4))
                series["train/loss"][step] = float(m.group(5))
                series["train/grad_norm"][step] = float(m.group(6))
                continue
            m = _VAL_RE.search(line)
            if m and epoch is not None:  # an --eval run's line has no epoch to go with
                series["val/acc1"][float(epoch)] = float(m.group(1))
                series["val/acc5"][float(epoch)] = float(m.group(2))
                # One validation per epoch: a later line before the next epoch's training (an
                # --eval run appended to the same log, as `make demo` does) is not this epoch's.
                epoch = None
    return {tag: _sorted_unique(points) for tag, points in series.items() if points}


def read_scalars(output_dir: str) -> tuple[dict[str, Series], str]:
    """The run's scalars and where they came from ('tensorboard' or the log file's path)."""
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir} is not a folder; pass a run's output folder (OUTPUT/MODEL.NAME/TAG)")
    scalars = read_event_scalars(output_dir)
    if scalars:
        return scalars, "tensorboard"
    folder = _single(_dirs_with(output_dir, lambda f: f == LOG_NAME), LOG_NAME, output_dir)
    if folder is None:
        raise UserError(
            f"{output_dir} holds neither TensorBoard event files nor {LOG_NAME}; pass a run's output folder"
        )
    path = os.path.join(folder, LOG_NAME)
    scalars = parse_log(path)
    if not scalars:
        raise UserError(f"{path} holds no training or validation lines to plot")
    return scalars, path


def plot_curves(scalars: dict[str, Series], out_path: str, title: str = "") -> str:
    """2×2 panels: loss, learning rate, grad norm (per step), val Acc@1/Acc@5 (per epoch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], ["train/loss"], "training loss", "step"),
        (axes[0, 1], ["train/lr"], "learning rate", "step"),
        (axes[1, 0], ["train/grad_norm"], "gradient norm (before clipping)", "step"),
        (axes[1, 1], ["val/acc1", "val/acc5"], "validation accuracy (%)", "epoch"),
    ]
    for ax, tags, name, xlabel in panels:
        drawn = False
        for tag in tags:
            points = scalars.get(tag, [])
            if points:
                xs, ys = zip(*points, strict=True)
                label = {"val/acc1": "Acc@1", "val/acc5": "Acc@5"}.get(tag, tag)
                ax.plot(xs, ys, marker="o" if xlabel == "epoch" else None, ms=4, lw=1.4, label=label)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        if xlabel == "epoch":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.5")
        elif len(tags) > 1:
            ax.legend()
            last = scalars.get("val/acc1")
            if last:
                ax.annotate(
                    f"{last[-1][1]:.1f}%", xy=last[-1], xytext=(-10, -18), textcoords="offset points", fontsize=9
                )
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    return out_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output folder (OUTPUT/MODEL.NAME/TAG)")
    p.add_argument("--out", help="PNG to write (default OUTPUT_DIR/curves.png)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    scalars, source = read_scalars(args.output_dir)
    out = args.out or os.path.join(args.output_dir, "curves.png")
    label = "TensorBoard events" if source == "tensorboard" else os.path.basename(source)
    plot_curves(scalars, out, f"{os.path.normpath(args.output_dir)} (from {label})")
    print(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
