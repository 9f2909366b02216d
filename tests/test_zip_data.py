"""The zip layout (--zip, DATA.CACHE_MODE): same images, order, tensors and metrics as class folders.

Each test writes a small class-folder dataset with PIL, zips it with the library's
``write_zip_split`` (what ``scripts/prepare_imagenet.py --zip`` runs) and compares the two readers.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_OPTS, float_images, read_sample
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import main as main_module
from config import get_config
from data import build_dataset, build_loader
from data.zip_dataset import (
    ZipImageDataset,
    class_names,
    map_path,
    parse_map,
    write_map,
    write_zip_split,
    zip_path,
)
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)(?: of (\d+))?")
CLASSES = ["cat", "dog", "eel"]


def cfg(root: Path, *opts) -> object:
    base = ["DATA.NUM_WORKERS", "0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "4"]
    base += ["DATA.DATA_PATH", str(root), "DATA.IMG_SIZE", "16", "TEST.CROP", "False"]
    return get_config(opts=base + [str(o) for o in opts])


def zcfg(root: Path, *opts) -> object:
    return cfg(root, "DATA.ZIP_MODE", "True", *opts)


def save_image(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(path, fmt)


def make_layout(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """Class folders train/ and val/ (PNG and JPEG mixed) plus the zip layout of the same files."""
    seed = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in CLASSES:
            for i in range(n):
                fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                save_image(root / split / cls / f"{i}.{ext}", seed, fmt)
                seed += 1
    zip_layout(root)
    return root


def zip_layout(root: Path, compression: int = zipfile.ZIP_STORED) -> None:
    class_to_idx = {c: i for i, c in enumerate(CLASSES)}
    for split in ("train", "val"):
        if compression == zipfile.ZIP_STORED:
            write_zip_split(str(root / split), zip_path(str(root), split), map_path(str(root), split), class_to_idx)
        else:
            members = parse_map(map_path(str(root), split))
            with zipfile.ZipFile(zip_path(str(root), split), "w", compression=compression) as zf:
                for member, _ in members:
                    zf.write(root / split / member, member)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def member(sample_path: str) -> str:
    return sample_path.split(".zip/", 1)[1]


# -----------------------------------------------------------------------------
# Same samples and tensors as folders
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no", "part", "full"])
def test_zip_split_lists_the_folder_samples_in_order_and_gives_equal_tensors_in_every_cache_mode(tmp_path, mode):
    root = make_layout(tmp_path)
    for is_train, rank, world in ((True, 1, 3), (False, 0, 2)):
        folder, n_folder = build_dataset(is_train, cfg(root), substitute=False)
        zipped, n_zip = build_dataset(is_train, zcfg(root, "DATA.CACHE_MODE", mode), rank=rank, world_size=world)
        assert n_zip == n_folder == 3 and zipped.classes == folder.classes == CLASSES
        assert [member(p) for p, _ in zipped.samples] == [os.path.relpath(p, folder.root) for p, _ in folder.samples]
        assert zipped.targets == folder.targets
        base = zipped.base
        n = len(base)
        # full: every image; part: the indices i % world == rank (val never keeps more than part).
        share = {i for i in range(n) if i % world == rank}
        expected = {"no": set(), "part": share, "full": set(range(n)) if is_train else share}[mode]
        assert {i for i in range(n) if base._cache_start[i] >= 0} == expected
        assert base.cache_bytes == sum(os.path.getsize(folder.samples[i][0]) for i in expected)
        for i in range(n):
            # Seeded keys: the train transform draws the same crops/flips for both readers.
            key = (i, 1234 + i) if is_train else i
            a, b = zipped[key], folder[key]
            assert torch.equal(float_images(a[0]), float_images(b[0])) and a[1] == b[1] and len(a) == len(b) == 2


def test_training_batches_from_the_zip_equal_the_folder_batches_and_resume_mid_epoch(tmp_path):
    root = make_layout(tmp_path, n_train=5)  # 15 images: 3 batches of 4, the last partial one dropped
    for mode in ("no", "full"):
        zipped = list(build_loader(zcfg(root, "DATA.CACHE_MODE", mode, "SEED", "3"), 1, 0).loader_train)
        folder = list(build_loader(cfg(root, "SEED", "3"), 1, 0).loader_train)
        assert len(zipped) == len(folder) == 3
        for (xa, ya), (xb, yb) in zip(zipped, folder, strict=True):
            assert torch.equal(float_images(xa), float_images(xb)) and torch.equal(ya, yb)
    # Resuming after 2 batches gives the rest of the uninterrupted epoch.
    resumed = list(build_loader(zcfg(root, "SEED", "3"), 1, 0, train_start_index=8).loader_train)
    assert len(resumed) == 1 and torch.equal(float_images(resumed[0][0]), float_images(zipped[2][0]))


def test_deflated_members_read_like_stored_ones(tmp_path):
    root = make_layout(tmp_path)
    stored, _ = build_dataset(False, zcfg(root))
    zip_layout(root, zipfile.ZIP_DEFLATED)
    deflated, _ = build_dataset(False, zcfg(root))
    assert all(torch.equal(float_images(stored[i][0]), float_images(deflated[i][0])) for i in range(len(stored)))


# -----------------------------------------------------------------------------
# Processes: one open file per process, never pickled
# -----------------------------------------------------------------------------
def test_loader_workers_open_their_own_zip_handle_and_give_the_main_process_batches(tmp_path):
    root = make_layout(tmp_path, n_train=4)
    config = zcfg(root, "DATA.CACHE_MODE", "no")
    plain = build_loader(config, 1, 0)
    # The parent has an open handle before the workers fork: they must not share it.
    plain.dataset_train[0]
    base = plain.dataset_train.base
    assert base._pid == os.getpid() and base._file is not None
    copy = pickle.loads(pickle.dumps(base))
    path = base.samples[0][0]
    assert copy._file is None and np.array_equal(np.asarray(copy.load(path)), np.asarray(base.load(path)))
    # A forked process opens its own descriptor on first read, leaving the inherited one alone.
    parent_fd = base._file.fileno()
    results = multiprocessing.get_context("fork").SimpleQueue()

    def child() -> None:
        base.load(path)
        results.put((base._pid == os.getpid(), base._file.fileno() != parent_fd))

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0 and results.get() == (True, True)
    workers = build_loader(zcfg(root, "DATA.CACHE_MODE", "no", "DATA.NUM_WORKERS", "2"), 1, 0)
    assert workers.loader_train.num_workers == 2 or os.cpu_count() == 1
    for epoch in range(2):  # persistent workers keep their handles across epochs
        for bundle in (plain, workers):
            bundle.sampler_train.set_epoch(epoch)
        a, b = list(plain.loader_train), list(workers.loader_train)
        assert len(a) == len(b) == 3
        assert all(
            torch.equal(float_images(x[0]), float_images(y[0])) and torch.equal(x[1], y[1])
            for x, y in zip(a, b, strict=True)
        )
    assert base._pid == os.getpid()  # the parent's handle is untouched


# -----------------------------------------------------------------------------
# Unreadable members
# -----------------------------------------------------------------------------
def _corrupt_stored_member(zip_file: str, name: str) -> None:
    """Flip a byte in the stored data of ``name`` (the zip stays valid; its CRC no longer matches)."""
    with zipfile.ZipFile(zip_file) as zf:
        info = zf.getinfo(name)
    with open(zip_file, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_missing_and_undecodable_members_are_substituted_in_training_and_excluded_in_eval(tmp_path, caplog):
    root = make_layout(tmp_path, n_val=3)
    truncate(root / "val" / "cat" / "1.jpg")  # undecodable image bytes in a sound zip
    zip_layout(root)
    _corrupt_stored_member(str(root / "val.zip"), "dog/0.png")  # CRC mismatch
    members = parse_map(map_path(str(root), "val"))
    write_map(map_path(str(root), "val"), [*members, ("eel/missing.png", 2)])  # listed, not in the zip
    with caplog.at_level("WARNING"):
        val, _ = build_dataset(False, zcfg(root, "DATA.CACHE_MODE", "full"))
    assert "1 of the 10 images" in caplog.text and "eel/missing.png" in caplog.text
    bad = {1: "val.zip/cat/1.jpg", 3: "val.zip/dog/0.png", 9: "val.zip/eel/missing.png"}
    for i in range(len(val)):
        img, target, replaced = read_sample(val, i)
        assert replaced.endswith(bad[i]) if i in bad else replaced == ""
        if i in bad:
            # A blank placeholder without a class (-1), for the evaluation to drop.
            black = img * torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(
                3, 1, 1
            )
            assert target == -1 and black.abs().max() < 1e-6
    train_view, _ = build_dataset(False, zcfg(root), substitute=True)
    img, target, replaced = read_sample(train_view, 3)
    assert replaced.endswith("dog/0.png") and target == 1 and torch.equal(img, float_images(train_view[4][0]))
    with pytest.raises(UserError) as err:
        build_dataset(False, zcfg(root, "DATA.STRICT", "True"))[0][9]
    assert "eel/missing.png" in assert_one_line(err)


def test_eval_through_main_on_the_zip_reports_exactly_what_it_reports_on_the_folders(tmp_path, capsys):
    from checkpoint import save_checkpoint
    from models import build_model

    root = make_layout(tmp_path / "data", n_train=2, n_val=3)
    truncate(root / "val" / "eel" / "2.png")  # excluded by both readers
    zip_layout(root)
    model = build_model(get_config(DEMO_CFG, TINY_RUN_OPTS + ["MODEL.NUM_CLASSES", "3"]))
    ckpt = tmp_path / "random.pth"
    save_checkpoint(str(ckpt), {"model": model.state_dict(), "epoch": 0})

    def evaluate(*extra: str) -> tuple:
        args = ["--cfg", DEMO_CFG, "--data-path", str(root), "--output", str(tmp_path / "out"), "--device", "cpu"]
        args += ["--batch-size", "4", "--eval", "--resume", str(ckpt), *extra, "--opts", *TINY_RUN_OPTS]
        code = main_module.main(args)
        out = capsys.readouterr()
        assert code == 0, out.err
        found = ACC_LINE.findall(out.out)
        assert len(found) == 1, out.out
        return found[0]

    folder = evaluate("--tag", "folders")
    zipped = evaluate("--tag", "zip", "--zip", "--cache-mode", "full")
    assert zipped == folder and folder[3:] == ("8", "9")


# -----------------------------------------------------------------------------
# Layout errors and class names
# -----------------------------------------------------------------------------
def test_missing_layout_files_are_one_line_errors_naming_them(tmp_path):
    root = make_layout(tmp_path)
    (root / "val_map.txt").unlink()
    (root / "train.zip").unlink()
    with pytest.raises(UserError) as err:
        build_dataset(True, zcfg(root))
    msg = assert_one_line(err)
    assert "train.zip, val_map.txt are missing" in msg and "prepare_imagenet.py --zip" in msg


@pytest.mark.parametrize(
    "line,expected",
    [("cat/0.jpg\tnot-a-label", "line 2"), ("cat/0.jpg", "line 2"), ("cat/0.jpg\t-1", "line 2")],
)
def test_malformed_map_line_names_the_file_and_line(tmp_path, line, expected):
    root = make_layout(tmp_path)
    (root / "train_map.txt").write_text(f"cat/1.png\t0\n{line}\n")
    with pytest.raises(UserError) as err:
        build_dataset(True, zcfg(root))
    msg = assert_one_line(err)
    assert f"train_map.txt {expected}" in msg and "relative/path<TAB>label" in msg


def test_a_map_naming_no_member_of_its_zip_and_other_misuse_are_user_errors(tmp_path):
    root = make_layout(tmp_path)
    write_map(str(root / "val_map.txt"), [("val/cat/0.jpg", 0)])  # paths with a prefix the zip lacks
    with pytest.raises(UserError) as err:
        build_dataset(False, zcfg(root))
    assert "none of the 1 paths" in assert_one_line(err)
    (root / "train.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError) as err:
        build_dataset(True, zcfg(root))
    assert "not a readable zip file" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        build_dataset(True, zcfg(root, "DATA.DATASET", "imagenet22K"))
    assert "not supported yet" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        ZipImageDataset(str(root / "val.zip"), str(root / "val_map.txt"), cache_mode="some")
    assert "DATA.CACHE_MODE" in assert_one_line(err)


def test_class_names_are_the_folders_when_they_match_the_labels_one_to_one():
    train = [("n02/a.JPEG", 1), ("n01/b.JPEG", 0), ("n01/c.JPEG", 0)]
    assert class_names([train, [("ILSVRC2012_val_1.JPEG", 1)]]) == (["n01", "n02"], True)  # a flat val map
    assert class_names([[("a.png", 0), ("b.png", 2)]]) == (["0", "1", "2"], False)
    assert class_names([[("x/a.png", 0), ("x/b.png", 1)]]) == (["0", "1"], False)  # one folder, two labels
    assert class_names([[("x/a.png", 0), ("y/b.png", 2)]]) == (["0", "1", "2"], False)  # label 1 has no folder


def test_build_loader_caches_the_share_of_the_process_group_rank(tmp_path, monkeypatch):
    import data.build

    root = make_layout(tmp_path)
    monkeypatch.setattr(data.build, "_process_rank", lambda: (1, 2))  # rank 1 of a 2-process group
    bundle = build_loader(zcfg(root, "DATA.CACHE_MODE", "part"), 2, 1)
    for ds in (bundle.dataset_train, bundle.dataset_val):
        cached = [i for i in range(len(ds)) if ds.base._cache_start[i] >= 0]
        assert cached == list(range(1, len(ds), 2))
    # --eval reads no training image: nothing of it is cached.
    evaluating = build_loader(zcfg(root, "DATA.CACHE_MODE", "full", "EVAL_MODE", "True"), 2, 1)
    assert evaluating.dataset_train.base.cached_count == 0 and evaluating.dataset_val.base.cached_count == 3
