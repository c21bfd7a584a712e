"""Property-based tests: random keys, types and values thrown at the config loader.

Every input must end in one of two ways: a `Config` that satisfies the invariants below (checked here
independently of the schema's own `__post_init__` checks), or a `ConfigError` whose message is one
line naming the key. Never another exception, never a traceback.

The default run is small and derandomized (the same examples every time, about 10 s);
`pytest -m slow tests/config/test_config_fuzz.py` throws 20x as many random ones.
`--hypothesis-show-statistics` prints how many examples each test tried; the counts are also
printed at the end of the module (`-s`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline.config import Config, ConfigError, config_from_dict, load_config
from pipeline.config import schema as S
from pipeline.config.loader import one_line
from tests.conftest import run_cli

FAST = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=6000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
COUNTS: collections.Counter = collections.Counter()


# ---- what the schema looks like -------------------------------------------------------------------------
def _leaves(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Dotted key -> type hint, for every leaf field of the schema."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_leaves(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


LEAVES = _leaves(Config)
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES} | {k.split(".")[0] for k in LEAVES})
CHOICES = {"train.precision": S.PRECISIONS, "optim.name": S.OPTIMIZERS, "scheduler.name": S.SCHEDULERS,
           "optim.loss": S.LOSSES, "train.monitor_mode": S.MODES, "logging.wandb_mode": S.WANDB_MODES,
           "finetune.freeze": S.FREEZE_STRATEGIES, "imbalance.class_weights": S.CLASS_WEIGHT_MODES,
           "train.nonfinite": S.NONFINITE_POLICIES, "data.channels": (1, 3),
           "train.monitor": ("val/accuracy", "val/loss", "val/f1_macro", "val/auroc")}
AT_LEAST = {"train.epochs": 1, "train.batch_size": 1, "train.eval_batch_size": 1, "train.grad_accum_steps": 1,
            "train.log_every_steps": 1, "train.max_nonfinite_steps": 1, "data.image_size": 1, "data.num_workers": 0,
            "data.shuffle_buffer": 1, "checkpoint.keep_last": 1, "checkpoint.check_every_steps": 1,
            "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0, "train.max_grad_norm": 0,
            "optim.weight_decay": 0,            "cv.folds": 2, "train.seed": 0, "cv.seed": 0, "scheduler.step_size": 1,
            "scheduler.warmup_steps": 0,            "finetune.unfreeze_every": 1, "report.feature_map_channels": 1,
            "train.early_stopping_patience": 0}
UNIT_INTERVAL = ("model.dropout", "optim.label_smoothing", "optim.momentum", "data.augment.hflip",
                 "scheduler.min_lr_ratio", "scheduler.gamma", "finetune.layer_decay")


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _has_type(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, float) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    if hint is str:
        return isinstance(value, str) and "\0" not in value
    if hint is bool:
        return isinstance(value, bool)
    return hint is typing.Any


def assert_valid(cfg: Config) -> None:
    """What any loaded config must satisfy, whatever produced it."""
    assert isinstance(cfg, Config)
    for key, hint in LEAVES.items():
        assert _has_type(_get(cfg, key), hint), (key, _get(cfg, key), hint)
    for key, choices in CHOICES.items():
        assert _get(cfg, key) in choices, key
    for key, low in AT_LEAST.items():
        assert _get(cfg, key) >= low, key
    for key in UNIT_INTERVAL:
        assert 0 <= _get(cfg, key) <= 1, key
    assert cfg.train.seed < 2**32 and len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas)
    assert len(cfg.data.mean) in (1, cfg.data.channels) and len(cfg.data.std) in (1, cfg.data.channels)
    assert all(s > 0 for s in cfg.data.std) and cfg.model.channels and all(c > 0 for c in cfg.model.channels)
    assert cfg.run.name not in ("", ".", "..") and "/" not in cfg.run.name and cfg.run.output_dir and cfg.data.root
    assert -1 <= cfg.cv.fold < cfg.cv.folds and cfg.optim.lr > 0 and cfg.logging.wandb_init_timeout > 0
    assert not (cfg.finetune.freeze == "partial" and not cfg.finetune.trainable)
    assert cfg.data.image_size <= S.MAX_IMAGE_SIZE and len(cfg.run.name) <= 255
    assert len(cfg.logging.wandb_project) <= 128
    assert cfg.model.name != "simple_cnn" or cfg.data.image_size >= 2 ** len(cfg.model.channels)
    # The resolved config rebuilds to itself (what the run folder's config.yaml relies on).
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg


def outcome(load, keys: list[str] = ()) -> str:
    """Run `load`; a Config must be valid, a ConfigError one line naming one of `keys`; anything else fails."""
    try:
        cfg = load()
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        if keys:
            assert any(_named(message, k) for k in keys), (message, keys)
        COUNTS["error"] += 1
        event("ConfigError")
        return "error"
    assert_valid(cfg)
    COUNTS["valid"] += 1
    event("valid config")
    return "valid"


def _named(message: str, key: str) -> bool:
    """The message names the key, or the part of it that exists in the schema (e.g. 'train' for 'train.x.y')."""
    if not str(key).strip():
        return "empty" in message or "''" in message
    if one_line(str(key)) in message:
        return True
    parts = [one_line(p.strip()) for p in str(key).split("[")[0].split(".")]  # a[0] is OmegaConf's index syntax
    return any(".".join(parts[:n]) in message for n in range(len(parts), 0, -1) if ".".join(parts[:n]))


# ---- strategies -----------------------------------------------------------------------------------------
SPECIAL_TEXT = ["nan", "inf", "-inf", "1e400", "-1", "0", "1", "1.5", "true", "null", "", "???", "[]", "{}", "[1, 2]",
                "[nan]", "{a: 1}", "[[1]]", "${oc.env:HOME}", "${nope}", "${", "0x10", "1_000", "2020-01-01", "~",
                "'quoted'", '"x"', "a: b", "- x", "[a, null]", "{1: 2}", "fp16", "..", "/", "a/b", "\t", "é"]
scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(SPECIAL_TEXT),
                   st.dates(), st.binary(max_size=4))
values = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
known_key = st.sampled_from(sorted(LEAVES))
mutated_key = st.one_of(known_key.map(lambda k: k + "x"), known_key.map(lambda k: k.upper()),
                        known_key.map(lambda k: k + ".deeper"), known_key.map(lambda k: k.rsplit(".", 1)[0]),
                        st.sampled_from(SECTIONS), known_key.map(lambda k: k + "[0]"))
any_key = st.one_of(known_key, known_key, mutated_key,
                    st.text(alphabet="abcxyz_.[]0 -", min_size=1, max_size=10))
override_value = st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=10),
                           st.integers(min_value=-(2**70), max_value=2**70).map(str),
                           st.floats().map(repr))


def _plausible(hint) -> st.SearchStrategy:
    """Values of the right type in a sensible range, so that many random configs are valid and get checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return st.one_of(st.none(), *(_plausible(a) for a in args if a is not type(None)))
    if origin is list:
        return st.lists(_plausible(args[0]), min_size=1, max_size=3)
    if origin is dict:
        return st.dictionaries(st.sampled_from(["layer4", "fc", "head*"]), _plausible(args[1]), max_size=2)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-2, 70)
    if hint is float:
        return st.one_of(st.floats(-1, 2), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    return st.sampled_from(sorted({c for cs in CHOICES.values() for c in cs if isinstance(c, str)}
                                  | {"x", "runs", "layer4", "resnet18", ""}))


plausible_override = known_key.flatmap(lambda k: _plausible(LEAVES[k]).map(
    lambda v: (k, yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip())))


@st.composite
def _config_dicts(draw, junk: bool) -> dict:
    data: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(any_key if junk else known_key)
        parts = [p for p in key.split(".") if p] or [key]
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            known = LEAVES.get(".".join(parts))
            plausible = known is not None and (not junk or draw(st.booleans()))
            node[parts[-1]] = draw(_plausible(known) if plausible else values)
    if junk and draw(st.booleans()):
        data[draw(st.one_of(st.integers(), st.none(), st.text(max_size=3)))] = draw(values)
    return data


def config_dicts() -> st.SearchStrategy:
    """A YAML-like nested dict: real sections and fields with plausible values, or with random values and junk."""
    return st.one_of(_config_dicts(junk=False), _config_dicts(junk=True))


yaml_text = st.one_of(
    config_dicts().map(lambda d: yaml.safe_dump(_yaml_safe(d), allow_unicode=True)),
    st.text(alphabet="train:epochs 123\n-[]{},'\"&*!#?.~@%|>", max_size=60),
    st.sampled_from(["- 1\n- 2", "7", "null", "", "train: {epochs: 3, epochs: 4}", "a: &x [1]\nb: *x",
                     "train: !!python/object:os.system {}", "? [a, b]\n: 1", "train:\n  epochs: 1\n bad: 2",
                     "\ufeffdata: {root: x}", "train: {epochs: 2020-01-01}", "finetune: {lr_mult: !!set {a, b}}"]))


def _yaml_safe(value):
    """safe_dump cannot write every key type hypothesis draws; keep the rest as it is."""
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _yaml_safe(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_safe(v) for v in value]
    return value


# ---- the properties -------------------------------------------------------------------------------------
def _dotlist_property(overrides: list[tuple[str, str]]) -> None:
    items = [f"{k}={v}" for k, v in overrides]
    outcome(lambda: load_config(None, items), [k for k, _ in overrides] if len(overrides) == 1 else ())


def _dict_property(data: dict) -> None:
    outcome(lambda: config_from_dict(data), [str(k) for k in data] if len(data) == 1 else ())


_TMP = Path(tempfile.mkdtemp(prefix="config-fuzz-"))


def _yaml_property(text: str) -> None:
    path = _TMP / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    outcome(lambda: load_config(path))


overrides = st.lists(st.one_of(plausible_override, plausible_override, st.tuples(any_key, override_value)),
                     min_size=1, max_size=3)


@FAST
@given(overrides)
def test_random_overrides(items: list[tuple[str, str]]) -> None:
    _dotlist_property(items)


@FAST
@given(config_dicts())
def test_random_config_dicts(data: dict) -> None:
    _dict_property(data)


@FAST
@given(yaml_text)
def test_random_yaml_documents(text: str) -> None:
    _yaml_property(text)


@pytest.mark.slow
@SLOW
@given(overrides)
def test_random_overrides_many(items: list[tuple[str, str]]) -> None:
    _dotlist_property(items)


@pytest.mark.slow
@SLOW
@given(config_dicts())
def test_random_config_dicts_many(data: dict) -> None:
    _dict_property(data)


@pytest.mark.slow
@SLOW
@given(yaml_text)
def test_random_yaml_documents_many(text: str) -> None:
    _yaml_property(text)


# ---- what the fuzzing found (kept as plain regression tests) --------------------------------------------
@pytest.mark.parametrize("overrides, fragment", [
    (["optim.lr=nan"], "optim.lr=nan is not a finite number"),
    (["optim.lr=1e400"], "optim.lr=inf is not a finite number"),
    (["data.std=[nan]"], "must be finite numbers"),
    (["scheduler.gamma=nan"], "scheduler.gamma=nan is not a finite number"),
    (["finetune.lr_mult={a: .inf}"], "finetune.lr_mult.a=inf must be a finite number"),
    (["optim.class_weights=[nan]"], "must be finite and non-negative"),
    (["train.seed=-1"], "train.seed=-1 is out of range"),
    (["train.seed=99999999999999999999"], "train.seed=99999999999999999999 is out of range"),
    (["train.epochs=99999999999999999999"], "train.epochs=99999999999999999999 is too large"),
    (["finetune.lr_mult=[1]"], "bad value for 'finetune.lr_mult' (from command line): a list where a mapping"),
    (["data.mean={a: 1}"], "bad value for 'data.mean' (from command line): a mapping where a list"),
    (["model.channels=[1,[2]]"], "bad value for 'model.channels[1]' (from command line): a list where an int"),
    (["report.feature_map_layers=[a,null]"], "'report.feature_map_layers[1]' (from command line): null where text"),
    (["run.name=???"], "'???' marks a missing value"),
    (["run.name=.."], "run.name='..' must be a folder name"),
    (["run.name=${nope}"], "bad value for 'run.name' (from config): Interpolation key 'nope' not found"),
    (["train..epochs=1"], "has an empty key part"),
    (["[.b-a[]y] =x"], "override key '[.b-a[]y] ' is not a dotted name"),
])
def test_bugs_found_by_fuzzing(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("{null: 1}", "config key None under 'the top level'"),
    ("train: {epochs: 2020-01-01}", "bad value for 'train.epochs' (from F): a date (2020-01-01; quote it"),
    ("finetune: {lr_mult: !!set {a, b}}", "bad value for 'finetune.lr_mult' (from F): a set where a mapping"),
    ("finetune: {lr_mult: {null: 2}}", "key None is null; keys must be text"),
    ("train: {epochs: 3, epochs: 4}", "the key 'epochs' is given twice"),
    ("data: {root: \"a\\0b\"}", "bad value for 'data.root' (from F): the text contains a NUL character"),
    ("run: {name: \"x\\ny\"}", "must be a folder name"),
    ("finetune: {trainable: [{a: 1}]}", "bad value for 'finetune.trainable[0]' (from F): a mapping where text"),
])
def test_yaml_bugs_found_by_fuzzing(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value).replace(str(path), "F")
    assert fragment in message and "\n" not in message


# ---- a few through the real command line (each a process: kept few) --------------------------------------
CLI_CASES = [["train.epochs=nan"], ["finetune.lr_mult=[1]"], ["run.name=???"], ["data.mean={a: 1}"],
             ["train.seed=-5", "optim.lr=0"]]


@pytest.mark.parametrize("overrides", CLI_CASES)
def test_cli_rejects_fuzzed_input_in_one_line(overrides: list[str]) -> None:
    result = run_cli(["train", *overrides], check=False, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    COUNTS["cli"] += 1


@pytest.mark.slow
@settings(max_examples=25, deadline=None, database=None)
@given(overrides)
def test_cli_random_overrides_never_traceback(items: list[tuple[str, str]]) -> None:
    args = [f"{k}={v}" for k, v in items if "\0" not in k + v]
    args = [a for a in args if not a.startswith("-")] or ["train.epochs=0"]  # argparse options are not overrides
    result = run_cli(["train", *args, "train.epochs=0"], check=False, timeout=60)  # never reaches training
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len([x for x in result.stderr.splitlines() if x.strip()]) == 1, result.stderr
    COUNTS["cli"] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nconfig fuzzing: {sum(COUNTS.values())} examples "
          f"({COUNTS['valid']} valid configs, {COUNTS['error']} one-line ConfigErrors, {COUNTS['cli']} CLI runs)")
