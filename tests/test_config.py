"""The config system: defaults once, YAML inheritance, --opts overrides, clear refusals."""

from __future__ import annotations

import os

import pytest
import yaml

from config import _C, config_from_args, config_from_yaml_text, get_config
from errors import UserError
from main import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def test_every_default_has_a_comment_line_above_it():
    source = open(os.path.join(ROOT, "config.py")).read().splitlines()
    for i, line in enumerate(source):
        if line.startswith("_C.") and " = " in line and "CN()" not in line:
            assert source[i - 1].lstrip().startswith("#"), f"default without a comment: {line}"


def test_official_tiny_config_sets_the_released_hyper_parameters():
    c = get_config(os.path.join(ROOT, "configs", "swin", "swin_tiny_patch4_window7_224.yaml"))
    assert c.MODEL.NAME == "swin_tiny_patch4_window7_224"
    assert list(c.MODEL.SWIN.DEPTHS) == [2, 2, 6, 2]
    assert list(c.MODEL.SWIN.NUM_HEADS) == [3, 6, 12, 24]
    assert c.MODEL.DROP_PATH_RATE == 0.2
    # The recipe's defaults (paper Appendix A2 / released config).
    assert (c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS, c.TRAIN.BASE_LR, c.TRAIN.WEIGHT_DECAY) == (300, 20, 5e-4, 0.05)
    assert (c.TRAIN.CLIP_GRAD, c.AUG.MIXUP, c.AUG.CUTMIX, c.AUG.REPROB) == (5.0, 0.8, 1.0, 0.25)
    assert c.AUG.AUTO_AUGMENT == "rand-m9-mstd0.5-inc1"
    assert c.OUTPUT == os.path.join("output", "swin_tiny_patch4_window7_224", "default")
    assert c.is_frozen()


def test_alias_config_inherits_through_base(tmp_path):
    c = get_config(os.path.join(ROOT, "configs", "swin_small.yaml"))
    assert c.MODEL.NAME == "swin_small_patch4_window7_224"
    assert list(c.MODEL.SWIN.DEPTHS) == [2, 2, 18, 2]


def test_a_single_base_may_be_written_as_a_string(tmp_path):
    _write(tmp_path / "parent.yaml", {"TRAIN": {"EPOCHS": 7}, "TAG": "parent"})
    child = _write(tmp_path / "child.yaml", {"BASE": "parent.yaml", "TAG": "child"})
    c = get_config(child)
    assert (c.TRAIN.EPOCHS, c.TAG) == (7, "child")


def test_base_chain_applies_in_order_and_child_wins(tmp_path):
    _write(tmp_path / "a.yaml", {"TRAIN": {"EPOCHS": 10, "BASE_LR": 1e-3}, "DATA": {"IMG_SIZE": 192}})
    _write(tmp_path / "b.yaml", {"BASE": ["a.yaml"], "TRAIN": {"EPOCHS": 20}})
    c = get_config(str(tmp_path / "b.yaml"))
    assert (c.TRAIN.EPOCHS, c.TRAIN.BASE_LR, c.DATA.IMG_SIZE) == (20, 1e-3, 192)


def test_official_release_style_yaml_loads_unchanged(tmp_path):
    # Exponents without a dot (YAML reads them as strings) and ints for float keys, as released files have.
    text = (
        "MODEL:\n  TYPE: swin\n  NAME: x\nTRAIN:\n  BASE_LR: 2e-05\n  WEIGHT_DECAY: 1e-8\n  CLIP_GRAD: 5\n"
        "AMP_OPT_LEVEL: O1\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    c = get_config(str(tmp_path / "c.yaml"))
    assert c.TRAIN.BASE_LR == 2e-5 and c.TRAIN.WEIGHT_DECAY == 1e-8
    assert isinstance(c.TRAIN.CLIP_GRAD, float) and c.TRAIN.CLIP_GRAD == 5.0


def test_opts_override_file_values():
    c = get_config(
        os.path.join(ROOT, "configs", "swin_tiny.yaml"),
        ["TRAIN.EPOCHS", "3", "MODEL.SWIN.DEPTHS", "[1,1,1,1]", "TRAIN.CLIP_GRAD", "0"],
    )
    assert c.TRAIN.EPOCHS == 3 and list(c.MODEL.SWIN.DEPTHS) == [1, 1, 1, 1] and c.TRAIN.CLIP_GRAD == 0.0


def test_unknown_yaml_key_is_refused_with_the_closest_valid_key(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"TRAIN": {"EPOCH": 3}})
    with pytest.raises(UserError, match=r"unknown config key TRAIN\.EPOCH .*did you mean TRAIN\.EPOCHS\?"):
        get_config(path)


def test_unknown_opts_key_is_refused_with_the_closest_valid_key():
    with pytest.raises(UserError, match=r"MODEL\.SWIN\.WINDOW_SZE in --opts; did you mean MODEL\.SWIN\.WINDOW_SIZE\?"):
        get_config(None, ["MODEL.SWIN.WINDOW_SZE", "12"])


def test_wrong_value_type_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        get_config(None, ["TRAIN.EPOCHS", "abc"])
    assert "TRAIN.EPOCHS" in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        get_config("no/such/file.yaml")


def test_odd_number_of_opts_is_refused():
    with pytest.raises(UserError, match="KEY VALUE pairs"):
        get_config(None, ["TRAIN.EPOCHS"])


def test_cli_flags_land_on_the_official_keys(tmp_path):
    args = parse_args(
        [
            "--cfg",
            os.path.join(ROOT, "configs", "swin_tiny.yaml"),
            "--batch-size",
            "32",
            "--data-path",
            "/d",
            "--accumulation-steps",
            "2",
            "--use-checkpoint",
            "--disable_amp",
            "--output",
            str(tmp_path),
            "--tag",
            "t",
            "--eval",
            "--throughput",
            "--fused_window_process",
            "--optim",
            "sgd",
            "--resume",
            "r.pth",
            "--pretrained",
            "p.pth",
            "--zip",
            "--cache-mode",
            "full",
        ]
    )
    c = config_from_args(args)
    assert (c.DATA.BATCH_SIZE, c.DATA.DATA_PATH, c.TRAIN.ACCUMULATION_STEPS) == (32, "/d", 2)
    assert c.TRAIN.USE_CHECKPOINT and not c.AMP_ENABLE and c.EVAL_MODE and c.THROUGHPUT_MODE and c.FUSED_WINDOW_PROCESS
    assert (c.TRAIN.OPTIMIZER.NAME, c.MODEL.RESUME, c.MODEL.PRETRAINED) == ("sgd", "r.pth", "p.pth")
    assert c.DATA.ZIP_MODE and c.DATA.CACHE_MODE == "full"
    assert c.OUTPUT == os.path.join(str(tmp_path), "swin_tiny_patch4_window7_224", "t")


@pytest.mark.parametrize("level,amp", [("O0", False), ("O1", True), ("O2", True)])
def test_the_releases_amp_opt_level_flag_is_accepted_and_o0_turns_mixed_precision_off(level, amp):
    assert config_from_args(parse_args(["--amp-opt-level", level])).AMP_ENABLE is amp


def test_local_rank_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert config_from_args(parse_args([])).LOCAL_RANK == 3


def test_dumped_config_round_trips_through_yaml_text():
    c = get_config(os.path.join(ROOT, "configs", "swin_base.yaml"), ["TRAIN.EPOCHS", "7"])
    back = config_from_yaml_text(c.dump())
    assert back.TRAIN.EPOCHS == 7 and back.MODEL.SWIN.EMBED_DIM == 128 and back.MODEL.NAME == c.MODEL.NAME


def test_a_numeric_tag_stays_text_through_the_flag_opts_a_yaml_file_and_the_stored_config(tmp_path):
    """A run tagged with a date: config.yaml stores TAG: '2024', which yacs alone would read back
    as the integer 2024 and refuse (so predict.py could not rebuild the run's model)."""
    c = config_from_args(parse_args(["--tag", "2024", "--cfg", os.path.join(ROOT, "configs", "swin_tiny.yaml")]))
    back = config_from_yaml_text(c.dump())
    assert back.TAG == "2024" and back.dump() == c.dump()
    path = _write(tmp_path / "run.yaml", {"TAG": "2024", "MODEL": {"NAME": "007"}, "TRAIN": {"EPOCHS": 3}})
    from_file = get_config(path, ["DATA.DATA_PATH", "1234", "MODEL.RESUME", "'quoted.pth'"])
    assert (from_file.TAG, from_file.MODEL.NAME, from_file.TRAIN.EPOCHS) == ("2024", "007", 3)
    assert (from_file.DATA.DATA_PATH, from_file.MODEL.RESUME) == ("1234", "quoted.pth")
    with pytest.raises(UserError, match="TRAIN.EPOCHS"):  # numbers where numbers belong are still checked
        get_config(None, ["TRAIN.EPOCHS", "'3'"])


def test_defaults_are_not_mutated_by_get_config():
    before = _C.dump()
    get_config(None, ["TRAIN.EPOCHS", "1"])
    assert _C.dump() == before


def test_config_from_a_checkpoint_takes_checked_opts_on_top():
    stored = get_config(opts=["TRAIN.EPOCHS", "7"]).dump()
    config = config_from_yaml_text(stored, ["DATA.BATCH_SIZE", "3"])
    assert (config.TRAIN.EPOCHS, config.DATA.BATCH_SIZE) == (7, 3)
    with pytest.raises(UserError, match="unknown config key DATA.BATCH in --opts; did you mean DATA.BATCH_SIZE?"):
        config_from_yaml_text(stored, ["DATA.BATCH", "3"])
