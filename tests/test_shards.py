"""Sharded tar datasets (DATA.FORMAT shards): the converter, the per-rank epoch, worker and resume
invariance, unreadable samples, and an --eval that reports what the folders report.

Each test writes a small class-folder dataset with PIL and converts it with the real
``scripts/make_shards.py``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN_OPTS, float_images, read_sample
from PIL import Image

import main as main_module
from config import get_config
from data import build_dataset, build_loader
from data.shards import (
    INDEX_NAME,
    ShardStreamSampler,
    buffer_shuffle,
    expand_braces,
    members_by_headers,
    members_by_tarfile,
    resolve_shards,
    scan_shard,
)
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs" / "demo" / "swin_demo_digits.yaml")
ACC_LINE = re.compile(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) images (\d+)(?: of (\d+))?")
CLASSES = ["cat", "dog", "eel"]


def make_shards_main(*argv: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def save_image(path: Path, seed: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(path, fmt)


def make_folders(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    """train/ and val/ class folders, PNG and JPEG mixed (the JPEGs with an upper-case extension)."""
    seed = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in CLASSES:
            for i in range(n):
                fmt, ext = ("JPEG", "JPEG") if i % 2 else ("PNG", "png")
                save_image(root / split / cls / f"{i}.{ext}", seed, fmt)
                seed += 1
    return root


def make_dataset(tmp_path: Path, n_train: int = 4, n_val: int = 2, shard_size: int = 3) -> tuple[Path, Path]:
    folders = make_folders(tmp_path / "folders", n_train, n_val)
    out = tmp_path / "shards"
    assert make_shards_main("--data-path", folders, "--out", out, "--shard-size", shard_size) == 0
    return folders, out


def cfg(root: Path, *opts) -> object:
    base = ["DATA.NUM_WORKERS", "0", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "4"]
    base += ["DATA.DATA_PATH", str(root), "DATA.IMG_SIZE", "16", "TEST.CROP", "False", "DATA.FORMAT", "shards"]
    return get_config(opts=base + [str(o) for o in opts])


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(float_images(x), y) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# -----------------------------------------------------------------------------
# Converter
# -----------------------------------------------------------------------------
def test_converter_writes_original_bytes_labels_and_an_index_deterministically(tmp_path):
    folders, out = make_dataset(tmp_path, n_train=4, n_val=2, shard_size=5)
    files = sorted(p for p in (folders / "train").rglob("*") if p.is_file())  # ImageFolder's order
    for split, n in (("train", 12), ("val", 6)):
        index = json.loads((out / split / INDEX_NAME).read_text())
        shards = sorted((out / split).glob("*.tar"))
        assert [s.name for s in shards] == [f"{i:06d}.tar" for i in range(len(shards))] == list(index["shards"])
        assert index["classes"] == CLASSES and index["samples"] == n
        counts = [index["shards"][s.name]["samples"] for s in shards]
        assert counts == [5] * (n // 5) + ([n % 5] if n % 5 else [])
        assert all(index["shards"][s.name]["bytes"] == s.stat().st_size for s in shards)
        keys = []
        for shard in shards:
            members = tar_members(shard)
            for (image, data), (cls, label) in zip(members[::2], members[1::2], strict=True):
                key, ext = image.split(".")
                assert cls == f"{key}.cls" and len(key) == 8
                source = sorted(p for p in (folders / split).rglob("*") if p.is_file())[int(key)]
                assert ext == source.suffix[1:] and data == source.read_bytes()  # original bytes and extension
                assert int(label) == CLASSES.index(source.parent.name)
                keys.append(int(key))
        # Val keeps ImageFolder's order; train is shuffled across shards (each shard mixes classes).
        assert sorted(keys) == list(range(n))
        assert (keys == list(range(n))) == (split == "val")
    assert len(files) == 12
    first = {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")}
    assert make_shards_main("--data-path", folders, "--out", out, "--shard-size", 5) == 2  # shards already there
    assert make_shards_main("--data-path", folders, "--out", out, "--shard-size", 5, "--overwrite") == 0
    assert {p.name: p.read_bytes() for p in (out / "train").glob("*.tar")} == first  # same input, same bytes
    # --max-bytes: a shard closes before it would pass the limit. Every sample takes 5 tar blocks here
    # (image header + 2 data blocks, .cls header + 1 data block), so 3 fit in 15 blocks.
    assert make_shards_main("--data-path", folders, "--out", out, "--max-bytes", 15 * 512, "--overwrite") == 0
    index = json.loads((out / "train" / INDEX_NAME).read_text())
    assert [v["samples"] for v in index["shards"].values()] == [3, 3, 3, 3]
    # --index rewrites a lost index from the shards themselves, keeping no class names it cannot know.
    (out / "val" / INDEX_NAME).unlink()
    assert make_shards_main("--index", out / "val") == 0
    rebuilt = json.loads((out / "val" / INDEX_NAME).read_text())
    assert rebuilt["samples"] == 6 and rebuilt["classes"] == ["0", "1", "2"]


def test_brace_patterns_folders_and_globs_name_the_shards(tmp_path):
    assert expand_braces("a-{008..011}.tar") == [f"a-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("{x,y}/{0..1}.tar") == ["x/0.tar", "x/1.tar", "y/0.tar", "y/1.tar"]
    for bad in ("a-{1..}.tar", "a-{3..1}.tar", "a-{1..2.tar", "a-{{1,2}}.tar", "a}.tar"):
        with pytest.raises(UserError):
            expand_braces(bad)
    _, out = make_dataset(tmp_path, shard_size=3)  # train: 4 shards
    folder = resolve_shards(str(out / "train"), "x")
    assert folder == resolve_shards(str(out / "train" / "{000000..000003}.tar"), "x")
    assert folder == resolve_shards(str(out / "train" / "*.tar"), "x")
    with pytest.raises(UserError) as err:
        resolve_shards(str(out / "train" / "{000000..000009}.tar"), "DATA.SHARDS_TRAIN")
    assert "6 of the 10 shards of DATA.SHARDS_TRAIN" in assert_one_line(err)


def test_the_header_reader_matches_tarfile_and_leaves_pax_and_long_names_to_it(tmp_path):
    _, out = make_dataset(tmp_path, shard_size=5)
    for shard in sorted((out / "train").glob("*.tar")):
        with open(shard, "rb") as f:
            assert members_by_headers(f.fileno(), shard.stat().st_size) == members_by_tarfile(str(shard))
    # Other writers' tars: a folder member, a long (pax or GNU) name, another extension in a sample.
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"other{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            folder = tarfile.TarInfo("d")
            folder.type = tarfile.DIRTYPE
            tf.addfile(folder)
            for name, data in (("d/" + "x" * 120 + ".jpg", b"img"), ("d/" + "x" * 120 + ".cls", b"2")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            for name, data in (("y.png", b"png"), ("y.json", b"{}"), ("y.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            assert members_by_headers(f.fileno(), path.stat().st_size) is None  # long names: tarfile reads it
        table = scan_shard(str(path))
        assert table.names == ["d/" + "x" * 120 + ".jpg", "y.png"] and not table.error
        assert table.image_size.tolist() == [3, 3] and table.label_size.tolist() == [1, 1]


# -----------------------------------------------------------------------------
# Training epochs
# -----------------------------------------------------------------------------
def test_each_rank_takes_the_same_fixed_count_from_disjoint_shards(tmp_path):
    _, out = make_dataset(tmp_path, n_train=4, shard_size=3)  # 12 samples, 4 shards of 3
    samplers = []
    for rank in range(2):
        bundle = build_loader(cfg(out, "DATA.SHUFFLE_BUFFER", "4", "SEED", "5"), 2, rank)
        assert len(bundle.loader_train) == 1 and len(bundle.sampler_train) == 6  # 12 / 2 ranks, batches of 4
        samplers.append(bundle.sampler_train)
        dataset = bundle.dataset_train
    for epoch in range(3):
        runs = []
        for s in samplers:
            s.set_epoch(epoch)
            runs.append([i for i, _ in s])
        assert all(len(r) == 6 for r in runs)
        assert sorted(runs[0] + runs[1]) == list(range(12))  # every sample once per epoch
        shards = [{dataset.locate(i)[0] for i in r} for r in runs]
        assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
    # Augmentation seeds: one per global position, none repeated across the ranks.
    seeds = [seed for s in samplers for _, seed in s]
    assert len(set(seeds)) == 12
    # Unequal shards and a fixed epoch length: both ranks still take ceil(E / 2), wrapping around.
    for epoch_samples, per_rank in ((0, 8), (25, 13), (5, 3)):
        counts = [5, 1, 7, 2]  # 15 samples
        runs = [
            list(ShardStreamSampler(counts, 2, r, seed=1, shuffle_buffer=3, epoch_samples=epoch_samples))
            for r in range(2)
        ]
        assert [len(r) for r in runs] == [per_rank, per_rank]
        if epoch_samples == 0:  # 16 = 15 + 1 sample of padding
            assert set(i for r in runs for i, _ in r) == set(range(15))


def test_the_shuffle_buffer_keeps_reads_local_and_permutes_its_input():
    rng = np.random.default_rng(0)
    out = buffer_shuffle(list(range(1000)), 10, rng)
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # An item is emitted at most `size` positions before it enters the buffer.
    assert all(i >= v - 10 for i, v in enumerate(out))
    assert buffer_shuffle(np.arange(5), 0, rng) == [0, 1, 2, 3, 4]


def test_batches_are_the_same_with_0_and_2_loader_workers(tmp_path):
    _, out = make_dataset(tmp_path, n_train=5, shard_size=2)  # 15 samples: 3 batches of 4 per epoch
    plain = build_loader(cfg(out, "SEED", "3"), 1, 0)
    workers = build_loader(cfg(out, "SEED", "3", "DATA.NUM_WORKERS", "2"), 1, 0)
    assert workers.loader_train.num_workers == 2
    for epoch in range(2):  # persistent workers follow the epoch
        for bundle in (plain, workers):
            bundle.sampler_train.set_epoch(epoch)
        a, b = batches(plain.loader_train), batches(workers.loader_train)
        assert len(a) == 3 and same_batches(a, b)
        if epoch == 0:
            first = a
    assert not torch.equal(first[0][0], a[0][0])  # another epoch, another order
    assert same_batches(batches(workers.loader_val), batches(plain.loader_val))


def test_resume_within_an_epoch_gives_the_rest_of_the_uninterrupted_epoch(tmp_path):
    _, out = make_dataset(tmp_path, n_train=6, shard_size=4)  # 18 samples: 4 batches of 4
    config = cfg(out, "SEED", "7", "DATA.SHUFFLE_BUFFER", "5")
    full = build_loader(config, 1, 0)
    full.sampler_train.set_epoch(2)
    epoch = batches(full.loader_train)
    assert len(epoch) == 4
    # What main.py does after loading a checkpoint written after 3 batches of epoch 2 (workers too).
    for workers in ("0", "2"):
        resumed = build_loader(cfg(out, "SEED", "7", "DATA.SHUFFLE_BUFFER", "5", "DATA.NUM_WORKERS", workers), 1, 0)
        resumed.sampler_train.set_epoch(2)
        resumed.sampler_train.set_start_index(3 * 4)
        assert len(resumed.loader_train) == 1
        assert same_batches(batches(resumed.loader_train), epoch[3:])
        resumed.sampler_train.set_epoch(3)
        resumed.sampler_train.set_start_index(0)
        assert len(resumed.loader_train) == 4  # the skip applied to one epoch only
    with pytest.raises(UserError):
        full.sampler_train.set_start_index(19)


# -----------------------------------------------------------------------------
# Unreadable samples and missing indexes
# -----------------------------------------------------------------------------
def _rewrite_member(shard: Path, name: str, data: bytes | None) -> None:
    """Rewrite ``shard`` with member ``name``'s bytes replaced (None: the member dropped)."""
    members = tar_members(shard)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for member, payload in members:
            if member == name:
                if data is None:
                    continue
                payload = data
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_unreadable_samples_are_substituted_in_training_excluded_in_eval_and_strict_raises(tmp_path, caplog):
    _, out = make_dataset(tmp_path, n_train=2, n_val=3, shard_size=4)  # val: shards of 4, 4, 1
    val_shard = out / "val" / "000000.tar"
    names = [n for n, _ in tar_members(val_shard)]  # image, cls, image, cls, ...
    _rewrite_member(val_shard, names[2], tar_members(val_shard)[2][1][:40])  # sample 1: truncated image
    _rewrite_member(val_shard, names[5], None)  # sample 2: no .cls
    val, num_classes = build_dataset(False, cfg(out))
    assert num_classes == 3 and len(val) == 9
    bad = {1: names[2], 2: names[4]}
    for i in range(len(val)):
        img, target, replaced = read_sample(val, i)
        if i in bad:
            assert replaced == f"{val_shard}/{bad[i]}" and img.abs().sum() > 0  # a placeholder, to be excluded
        else:
            assert replaced == ""
    train_view, _ = build_dataset(False, cfg(out), substitute=True)
    img, target, replaced = read_sample(train_view, 1)
    # Substituted by the next readable sample (2 has no label either): sample 3.
    assert replaced.endswith(bad[1]) and target == train_view[3][1] and torch.equal(img, float_images(train_view[3][0]))
    with pytest.raises(UserError) as err:
        build_dataset(False, cfg(out, "DATA.STRICT", "True"))[0][2]  # noqa: B018 - reading raises
    assert "no .cls member" in assert_one_line(err) and bad[2] in str(err.value)

    # A shard cut inside sample 1's image: its size no longer matches the index, so it is counted
    # again (with a warning), sample 1 is unreadable and samples 2 and 3 are gone from the set.
    cut = out / "val" / "000001.tar"
    cut_names = [n for n, _ in tar_members(cut)]
    cut.write_bytes(cut.read_bytes()[: 5 * 512 + 700])
    with caplog.at_level("INFO"):
        val, _ = build_dataset(False, cfg(out))
    assert "counting the samples of 1 of 3 shards" in caplog.text and "truncated after 2 samples" in caplog.text
    assert len(val) == 7 and [read_sample(val, i)[2] for i in range(4, 7)] == ["", f"{cut}/{cut_names[2]}", ""]
    # An index that still claims 4 samples there: the missing ones are reported by position.
    index = json.loads((out / "val" / INDEX_NAME).read_text())
    index["shards"]["000001.tar"]["bytes"] = cut.stat().st_size
    (out / "val" / INDEX_NAME).write_text(json.dumps(index))
    val, _ = build_dataset(False, cfg(out))
    assert len(val) == 9 and [read_sample(val, i)[2] for i in range(6, 8)] == [f"{cut}#2", f"{cut}#3"]


def test_missing_shards_and_layout_mistakes_are_one_line_errors(tmp_path):
    _, out = make_dataset(tmp_path)
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg(tmp_path / "nowhere"))
    assert "DATA.SHARDS_TRAIN" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        get_config(opts=["DATA.FORMAT", "tfrecord"])
    assert "DATA.FORMAT" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        get_config(opts=["DATA.FORMAT", "shards", "DATA.ZIP_MODE", "True"])
    assert_one_line(err)
    assert get_config(opts=["DATA.FORMAT", "zip"]).DATA.ZIP_MODE
    assert get_config(opts=["DATA.ZIP_MODE", "True"]).DATA.FORMAT == "zip"
    (out / "train" / INDEX_NAME).write_text("{not json")
    with pytest.raises(UserError) as err:
        build_dataset(True, cfg(out))
    assert INDEX_NAME in assert_one_line(err)
    with pytest.raises(UserError) as err:
        build_loader(cfg(out, "TRAIN.PRETRAIN", "simmim"), 1, 0)
    assert "shards" in assert_one_line(err)


def test_shards_elsewhere_by_pattern_without_an_index_read_the_same_samples(tmp_path, caplog):
    _, out = make_dataset(tmp_path, shard_size=5)
    indexed = build_loader(cfg(out, "SEED", "1"), 1, 0)
    for split in ("train", "val"):
        (out / split / INDEX_NAME).unlink()
    n_train = len(list((out / "train").glob("*.tar")))
    pattern = ["DATA.SHARDS_TRAIN", str(out / "train" / f"{{000000..{n_train - 1:06d}}}.tar")]
    with caplog.at_level("INFO"):
        counted = build_loader(cfg("", "SEED", "1", *pattern, "DATA.SHARDS_VAL", out / "val"), 1, 0)
    assert "counting the samples of 3 of 3 shards" in caplog.text
    assert counted.class_names == ["0", "1", "2"] and counted.num_classes == 3  # no index: names are the labels
    assert same_batches(batches(counted.loader_train), batches(indexed.loader_train))
    assert same_batches(batches(counted.loader_val), batches(indexed.loader_val))


# -----------------------------------------------------------------------------
# Evaluation through main.py
# -----------------------------------------------------------------------------
def test_eval_through_main_on_shards_reports_exactly_what_it_reports_on_the_folders(tmp_path, capsys):
    from checkpoint import save_checkpoint
    from models import build_model

    folders = make_folders(tmp_path / "folders", n_train=2, n_val=3)
    (folders / "val" / "eel" / "2.png").write_bytes(b"not an image")  # excluded by both readers
    assert make_shards_main("--data-path", folders, "--out", tmp_path / "shards", "--shard-size", 2) == 0
    model = build_model(get_config(DEMO_CFG, TINY_RUN_OPTS + ["MODEL.NUM_CLASSES", "3"]))
    ckpt = tmp_path / "random.pth"
    save_checkpoint(str(ckpt), {"model": model.state_dict(), "epoch": 0})

    def evaluate(root: Path, *opts: str) -> tuple:
        args = ["--cfg", DEMO_CFG, "--data-path", str(root), "--output", str(tmp_path / "out"), "--device", "cpu"]
        args += ["--batch-size", "4", "--eval", "--resume", str(ckpt), "--tag", root.name]
        code = main_module.main([*args, "--opts", *TINY_RUN_OPTS, *opts])
        out = capsys.readouterr()
        assert code == 0, out.err
        found = ACC_LINE.findall(out.out)
        assert len(found) == 1, out.out
        return found[0]

    folder = evaluate(folders)
    sharded = evaluate(tmp_path / "shards", "DATA.FORMAT", "shards")
    assert sharded == folder and folder[3:] == ("8", "9")
