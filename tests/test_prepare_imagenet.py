"""scripts/prepare_imagenet.py on a small fake ILSVRC2012 download that each test writes.

Three wnids whose devkit IDs are deliberately not in sorted order (as in the real meta.mat),
train as per-class tars, per-class folders or the outer tar of tars, val as a flat folder
labelled by the devkit ground truth (with meta.mat or its text form) or by a CSV.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import float_images
from PIL import Image

from config import get_config
from data import build_dataset
from data.zip_dataset import parse_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import prepare_imagenet  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: labels 0, 1, 2
DEVKIT_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's order is not the sorted one
VAL_WNIDS = ["n01443537", "n01440764", "n01484850", "n01440764", "n01443537", "n01484850"]
N_TRAIN = 3


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """The fake download: train tars and folders, flat val, and every label format."""
    r = tmp_path / "raw"
    (r / "train_tars").mkdir(parents=True)
    for c, wnid in enumerate(WNIDS):
        with tarfile.open(r / "train_tars" / f"{wnid}.tar", "w") as tar:
            for i in range(N_TRAIN):
                data = jpeg_bytes(10 * c + i)
                add_bytes(tar, f"{wnid}_{i}.JPEG", data)
                (r / "train_dirs" / wnid).mkdir(parents=True, exist_ok=True)
                (r / "train_dirs" / wnid / f"{wnid}_{i}.JPEG").write_bytes(data)
    with tarfile.open(r / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid in WNIDS:
            outer.add(r / "train_tars" / f"{wnid}.tar", arcname=f"{wnid}.tar")
    (r / "val").mkdir()
    for k in range(1, len(VAL_WNIDS) + 1):
        (r / "val" / val_name(k)).write_bytes(jpeg_bytes(100 + k))
    (r / "gt.txt").write_text("".join(f"{DEVKIT_ID[w]}\n" for w in VAL_WNIDS))
    (r / "meta.txt").write_text("".join(f"{i} {w} some words\n" for w, i in DEVKIT_ID.items()))
    (r / "kaggle.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"{val_name(k)[:-5]},{w} 1 2 30 40 {w} 5 6 7 8\n" for k, w in enumerate(VAL_WNIDS, 1))
    )
    (r / "simple.csv").write_text("".join(f"{val_name(k)},{w}\n" for k, w in enumerate(VAL_WNIDS, 1)))
    return r


def write_meta_mat(path: Path) -> None:
    """A meta.mat shaped like the devkit's: a struct array 'synsets', leaves plus one inner node."""
    import scipy.io

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, "a thing", 0) for w, i in DEVKIT_ID.items()] + [(1001, "n00001740", "entity", 3)]
    synsets = np.array(rows, dtype=dtype).reshape(-1, 1)
    scipy.io.savemat(path, {"synsets": synsets})


def run(out: Path, *args: str) -> int:
    return prepare_imagenet.main(["--out", str(out), *args])


def assert_class_folders(out: Path, raw: Path) -> None:
    for c, wnid in enumerate(WNIDS):
        names = sorted(os.listdir(out / "train" / wnid))
        assert names == [f"{wnid}_{i}.JPEG" for i in range(N_TRAIN)]
        assert (out / "train" / wnid / names[0]).read_bytes() == jpeg_bytes(10 * c)
    for k, wnid in enumerate(VAL_WNIDS, 1):
        assert (out / "val" / wnid / val_name(k)).read_bytes() == (raw / "val" / val_name(k)).read_bytes()
    assert sum(len(os.listdir(out / "val" / w)) for w in WNIDS) == len(VAL_WNIDS)


def assert_zip_layout_reads_like_the_folders(out: Path) -> None:
    train_map = parse_map(str(out / "train_map.txt"))
    assert train_map[:2] == [(f"{WNIDS[0]}/{WNIDS[0]}_0.JPEG", 0), (f"{WNIDS[0]}/{WNIDS[0]}_1.JPEG", 0)]
    assert [label for _, label in parse_map(str(out / "val_map.txt"))] == [0, 0, 1, 1, 2, 2]
    opts = ["DATA.DATA_PATH", str(out), "DATA.IMG_SIZE", "16", "TEST.CROP", "False", "DATA.NUM_WORKERS", "0"]
    folder, n = build_dataset(False, get_config(opts=opts))
    zipped, n_zip = build_dataset(False, get_config(opts=opts + ["DATA.ZIP_MODE", "True"]))
    assert n == n_zip == 3 and zipped.classes == folder.classes == WNIDS
    assert zipped.targets == folder.targets
    assert all(torch.equal(float_images(zipped[i][0]), float_images(folder[i][0])) for i in range(len(folder)))


@pytest.mark.parametrize("train_form", ["train_tars", "train_dirs", "ILSVRC2012_img_train.tar"])
def test_train_in_each_form_and_devkit_ground_truth_with_meta_mat_give_class_folders_and_zip(
    raw: Path, tmp_path: Path, train_form: str
) -> None:
    write_meta_mat(raw / "meta.mat")
    out = tmp_path / "out"
    code = run(
        out,
        *("--train", str(raw / train_form), "--val", str(raw / "val")),
        *("--val-labels", str(raw / "gt.txt"), "--devkit-meta", str(raw / "meta.mat"), "--zip"),
    )
    assert code == 0
    assert_class_folders(out, raw)
    assert_zip_layout_reads_like_the_folders(out)
    with zipfile.ZipFile(out / "train.zip") as zf:
        assert {i.compress_type for i in zf.infolist()} == {0}  # ZIP_STORED


@pytest.mark.parametrize("labels", [("gt.txt", "meta.txt"), ("kaggle.csv", None), ("simple.csv", None)])
def test_each_val_label_format_sorts_val_into_the_same_class_folders(raw: Path, tmp_path: Path, labels) -> None:
    out = tmp_path / "out"
    meta = ["--devkit-meta", str(raw / labels[1])] if labels[1] else []
    args = ["--train", str(raw / "train_tars"), "--val", str(raw / "val"), "--val-labels", str(raw / labels[0])]
    assert run(out, *args, *meta) == 0
    assert_class_folders(out, raw)


def test_rerun_skips_what_is_in_place_and_link_hard_links_folder_inputs(raw: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    args = ["--train", str(raw / "train_dirs"), "--val", str(raw / "val"), "--val-labels", str(raw / "simple.csv")]
    assert run(out, *args, "--link", "--zip") == 0
    src = raw / "train_dirs" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"
    assert os.stat(src).st_ino == os.stat(out / "train" / WNIDS[1] / src.name).st_ino
    zip_mtime = os.stat(out / "train.zip").st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run(out, *args, "--zip") == 0
    assert "0 images written, 15 already in place" in caplog.text
    assert "train.zip is complete (9 images); skipped" in caplog.text
    assert os.stat(out / "train.zip").st_mtime_ns == zip_mtime
    # A lost image is written again, and the zip rebuilt to match.
    (out / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").unlink()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run(out, *args, "--zip") == 0
    assert "1 images written, 14 already in place" in caplog.text and "wrote " in caplog.text
    assert_zip_layout_reads_like_the_folders(out)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("nothing", "nothing to do"),
        ("gt-without-meta", "also pass --devkit-meta"),
        ("val-without-labels", "--val needs --val-labels"),
        ("unlabelled-val-image", "1 val image(s) have no label"),
        ("unknown-wnid", "no training class (e.g. n09999999)"),
        ("bad-csv-row", "simple.csv line 2"),
        ("missing-train", "does not exist"),
        ("damaged-tar", "is damaged"),
        ("zip-without-folders", "--zip needs"),
    ],
)
def test_bad_input_is_one_error_line_with_exit_status_2(raw: Path, tmp_path: Path, capsys, case, expected) -> None:
    out = tmp_path / "out"
    train = ["--train", str(raw / "train_tars")]
    val = ["--val", str(raw / "val"), "--val-labels", str(raw / "simple.csv")]
    if case == "nothing":
        args: list[str] = []
    elif case == "gt-without-meta":
        args = [*train, "--val", str(raw / "val"), "--val-labels", str(raw / "gt.txt")]
    elif case == "val-without-labels":
        args = [*train, "--val", str(raw / "val")]
    elif case == "unlabelled-val-image":
        (raw / "val" / val_name(99)).write_bytes(jpeg_bytes(0))
        args = [*train, *val]
    elif case == "unknown-wnid":
        with open(raw / "simple.csv", "a") as f:
            f.write(f"{val_name(7)},n09999999\n")
        args = [*train, *val]
    elif case == "bad-csv-row":
        (raw / "simple.csv").write_text(f"{val_name(1)},{WNIDS[0]}\n{val_name(2)}\n")
        args = [*train, *val]
    elif case == "missing-train":
        args = ["--train", str(raw / "nowhere"), *val]
    elif case == "damaged-tar":
        data = (raw / "train_tars" / f"{WNIDS[1]}.tar").read_bytes()
        (raw / "train_tars" / f"{WNIDS[1]}.tar").write_bytes(data[:700])
        args = [*train, *val]
    else:
        args = ["--zip"]
    assert run(out, *args) == 2
    if case in ("unlabelled-val-image", "unknown-wnid", "bad-csv-row"):
        assert not (out / "train").exists()  # found before any copying
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and expected in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_an_interrupted_run_from_the_outer_train_tar_is_simply_run_again(raw: Path, tmp_path: Path) -> None:
    """OUT/train of an interrupted run lacks classes: the val labels are checked against the
    outer tar's class tars, not against that partial folder."""
    out = tmp_path / "out"
    args = ["--train", str(raw / "ILSVRC2012_img_train.tar"), "--val", str(raw / "val")]
    args += ["--val-labels", str(raw / "simple.csv")]
    assert run(out, *args) == 0
    for name in os.listdir(out / "train" / WNIDS[2]):
        os.remove(out / "train" / WNIDS[2] / name)
    os.rmdir(out / "train" / WNIDS[2])  # as if stopped before the last class
    assert run(out, *args) == 0
    assert_class_folders(out, raw)


def test_an_unlabelled_image_in_a_val_tar_is_refused_before_anything_is_copied(raw: Path, tmp_path: Path, capsys):
    with tarfile.open(raw / "val.tar", "w") as tar:
        for k in range(1, len(VAL_WNIDS) + 1):
            tar.add(raw / "val" / val_name(k), arcname=val_name(k))
        add_bytes(tar, val_name(99), jpeg_bytes(0))
    out = tmp_path / "out"
    args = ["--train", str(raw / "train_tars"), "--val", str(raw / "val.tar"), "--val-labels", str(raw / "simple.csv")]
    assert run(out, *args) == 2
    assert "1 val image(s) have no label" in capsys.readouterr().err
    assert not (out / "train").exists()
