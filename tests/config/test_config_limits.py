"""Inputs built to exhaust the config loader end quickly in one line and exit 2 (issue 26, item 9): a YAML alias
bomb, megabytes of text in one value, an image size no model takes, and secret masking that stays linear."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.config.loader import MAX_ALIAS_VALUES
from pipeline.config.secrets import mask_text
from tests.conftest import run_cli

BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
               for prev, name in zip(["", *"abcdef"], "abcdefg"))
"""'Billion laughs', 7 levels: 9**7 = 4.8 million values from 300 bytes (ran 150 s until killed)."""


def _cli(args: list[str]) -> tuple[int, float, str]:
    """(exit code, seconds, first stderr line) of `pipeline ARGS`."""
    start = time.monotonic()
    result = run_cli(args, check=False, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.returncode, time.monotonic() - start, lines[0]


def test_yaml_alias_bomb_is_refused_before_it_is_built(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    code, seconds, line = _cli(["config", "show", str(path)])
    assert code == 2 and seconds < 5, (code, seconds)
    assert line == (f"error: config file '{path}' is refused: its anchors and aliases (&name, *name) expand to more "
                    f"than {MAX_ALIAS_VALUES:,} repeated values (a 'billion laughs' bomb?); write the values out or "
                    "use fewer aliases")


def test_alias_bomb_in_an_override_is_refused() -> None:
    levels = ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abc", "bcd")]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^override data.mean=\.\.\. \(command line\) is refused: its anchors"):
        load_config(None, [f"data.mean=[{', '.join(levels)}, [{', '.join(['*d'] * 9)}]]"])
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("text, fragment", [
    ("a: &a [1, *a]\n", "an alias (*name) refers to a mapping or list that holds it"),
    ("x: " + "[" * 40 + "]" * 40 + "\n", "nests mappings and lists more than 32 levels deep"),
])
def test_endless_or_deep_yaml_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is refused: ") as info:
        load_config(path)
    assert fragment in str(info.value)


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  mean: &m [0.5, 0.5, 0.5]\n  std: *m\n  train: &shards [a.tar, b.tar]\n"
                    "  val: *shards\n")
    cfg = load_config(path)
    assert cfg.data.std == [0.5, 0.5, 0.5] and cfg.data.val == ["a.tar", "b.tar"]


@pytest.mark.parametrize("key, limit", [("run.name", 255), ("logging.wandb_project", 128)])
def test_ten_megabytes_of_text_are_refused_in_a_moment(tmp_path: Path, key: str, limit: int) -> None:
    section, name = key.split(".")
    path = tmp_path / "big.yaml"
    path.write_text(f"{section}:\n  {name}: {'a' * 10_000_000}\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - start < 3  # (about 0.3 s unloaded: reading and parsing 10 MB)
    assert str(info.value) == (f"bad value for '{key}' (from {path}): the text is 10,000,000 characters long; "
                               f"at most {limit} are allowed")
    code, seconds, line = _cli(["config", "show", str(path)])
    assert code == 2 and seconds < 5 and line.startswith(f"error: bad value for '{key}'"), (code, seconds, line)


def test_long_text_keys_and_values_are_refused_everywhere() -> None:
    with pytest.raises(ConfigError, match=r"'data.train\[1\]' \(from command line\): the text is 20,000 characters "
                                          r"long; at most 16,384"):
        load_config(None, [f"data.train=[a.tar, {'b' * 20_000}]"])
    with pytest.raises(ConfigError, match="a config key of 1,000 characters under 'the top level'"):
        load_config(None, [f"{'k' * 1000}=1"])
    with pytest.raises(ConfigError, match="'finetune.lr_mult' .*: a key of 300 characters; at most 256"):
        load_config(None, [f"finetune.lr_mult={{{'l' * 300}: 0.1}}"])


@pytest.mark.parametrize("size, line", [
    (1, "error: data.image_size=1 is out of range for model.name=simple_cnn with 3 blocks (model.channels, each "
        "halves the image); it must be >= 8 and <= 4096"),
    (100000, "error: data.image_size=100000 is out of range; it must be >= 1 and <= 4096"),
])
def test_image_size_out_of_range_is_one_line(size: int, line: str) -> None:
    code, seconds, first = _cli(["train", f"data.image_size={size}"])
    assert (code, first) == (2, line) and seconds < 10


def test_image_size_a_torchvision_model_cannot_take_is_refused_at_start(digits_root: Path, tmp_path: Path) -> None:
    from pipeline.run.preflight import image_size_misfit

    assert image_size_misfit(load_config(None, ["model.name=resnet18"])) == ""
    assert image_size_misfit(load_config(None, ["model.name=vgg11", "data.image_size=16"])).endswith(
        "it must be >= 32 and <= 4096")
    assert "(Wrong image height! Expected 224 but got 32!)" in image_size_misfit(
        load_config(None, ["model.name=vit_b_16"]))
    code, seconds, line = _cli(["train", f"data.root={digits_root}", "model.name=alexnet", "train.epochs=1",
                                f"run.output_dir={tmp_path}", "logging.wandb_mode=disabled"])
    assert code == 2 and line.startswith("error: data.image_size=32 does not fit model.name=alexnet (")
    assert line.endswith("); it must be >= 63 and <= 4096") and not (tmp_path / "digits").exists()


@pytest.mark.parametrize("text", ["a" * 10_000, "token" * 2_000, "http://u:" + "p" * 10_000, "a://b:" * 2_000,
                                  "x=" * 5_000, "1" * 10_000 + "http://u:p@h"])
def test_masking_is_linear(text: str) -> None:
    """Each took 0.2-13 s for 10 KB with regular expressions tried from every character; 100x the text must cost
    about 100x, so a megabyte stays far below a second."""
    start = time.monotonic()
    mask_text(text)
    small = time.monotonic() - start
    start = time.monotonic()
    mask_text(text * 100)
    assert small < 0.1 and time.monotonic() - start < 2
