"""manifest.json is checked field by field before use: one line naming the field, never a read outside its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.dataset.manifest import Manifest
from tests.conftest import TINY, run_cli, run_main


def _valid() -> dict:
    shard = {"name": "train-000000.tar", "num_samples": 3, "num_bytes": 10, "sha256": ""}
    split = {"num_samples": 3, "class_counts": {"a": 2, "b": 1}, "shards": [shard]}
    return {"classes": ["a", "b"], "num_classes": 2, "splits": {"train": split}}


def _read(tmp_path: Path, data: object) -> Manifest:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return Manifest.read(root)


def _error(tmp_path: Path, data: object) -> str:
    with pytest.raises(ValueError) as info:
        _read(tmp_path, data)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "data" / "manifest.json"))
    return message


def test_valid_manifest_reads(tmp_path: Path) -> None:
    manifest = _read(tmp_path, _valid())
    assert manifest.classes == ["a", "b"] and manifest.split("train").shards[0].num_samples == 3


@pytest.mark.parametrize("name, why", [("../outside/evil.tar", "leaves the data folder"),
                                       ("/etc/passwd", "leaves the data folder"),
                                       ("sub/../../x.tar", "leaves the data folder")])
def test_shard_names_outside_the_folder(tmp_path: Path, name: str, why: str) -> None:
    data = _valid()
    data["splits"]["train"]["shards"][0]["name"] = name
    assert f"splits.train.shards[0].name={name!r} {why}" in _error(tmp_path, data)


def test_symlink_escaping_the_folder(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.tar").write_bytes(b"x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-000000.tar").symlink_to(tmp_path / "outside" / "evil.tar")
    assert "splits.train.shards[0].name='train-000000.tar' leaves the data folder" in _error(tmp_path, _valid())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["splits"]["train"]["shards"][0].update(num_samples=-1), "splits.train.shards[0].num_samples=-1"),
    (lambda d: d["splits"]["train"].update(num_samples="3"), "splits.train.num_samples='3'"),
    (lambda d: d["splits"]["train"]["class_counts"].update(a=5), "splits.train.class_counts['a']=5 is more than"),
    (lambda d: d["splits"]["train"]["class_counts"].update(a=1), "splits.train.class_counts={'a': 1, 'b': 1} adds up"),
    (lambda d: d["splits"]["train"]["shards"][0].update(num_samples=2), "splits.train.shards=1"),
    (lambda d: d.update(num_classes=3), "num_classes=3"),
    (lambda d: d["splits"]["train"]["class_counts"].update(c=0), "splits.train.class_counts='c' is not one"),
    (lambda d: d.pop("classes"), "classes is missing"),
    (lambda d: d["splits"]["train"]["shards"].append(7), "splits.train.shards[1]=7"),
])
def test_bad_fields_name_the_field(tmp_path: Path, mutate, field: str) -> None:
    data = _valid()
    mutate(data)
    assert f"manifest.json: {field}" in _error(tmp_path, data)


def test_not_json_or_not_an_object(tmp_path: Path) -> None:
    assert "not a JSON file" in _error(tmp_path, "{nope")
    assert "not a JSON object (it holds a list)" in _error(tmp_path, [1, 2])


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["splits"]["train"]["shards"][0].update(name="../outside/evil.tar"),  # a real process; the other
     "splits.train.shards[0].name='../outside/evil.tar' leaves the data folder"),  # cases call cli.main here
    (lambda d: d["splits"]["train"]["shards"][0].update(num_samples=-5), "splits.train.shards[0].num_samples=-5"),
    (lambda d: d["splits"]["val"].update(num_samples="270"), "splits.val.num_samples='270'"),
])
def test_cli_train_refuses_a_bad_manifest(digits_root: Path, tmp_path: Path, mutate, field: str) -> None:
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(digits_root, root)
    data = json.loads((root / "manifest.json").read_text())
    mutate(data)
    (root / "manifest.json").write_text(json.dumps(data))
    args = ["train", f"data.root={root}", "data.num_workers=0", f"run.output_dir={tmp_path / 'runs'}", *TINY]
    result = run_cli(args, check=False, timeout=120) if "evil" in field else run_main(args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and field in lines[-1], result.stderr[-2000:]
    assert not any("Traceback" in line for line in lines)


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10), st.floats(allow_nan=True), st.text(max_size=12),
                  st.sampled_from(["../x.tar", "/etc/passwd", "a/../../b", "ok.tar", "\x00"]),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every (key, ...) path into a nested dict/list."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_manifests_read_or_give_one_line(tmp_path: Path, data) -> None:
    """Random replacements, deletions and extra nesting: a Manifest whose shards stay inside, or one ValueError line."""
    manifest = _valid()
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(manifest)[1:]))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "nest"]))
        if action == "delete":
            parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
        else:
            parent[path[-1]] = data.draw(_JUNK) if action == "replace" else {"x": parent[path[-1]]}
        if not _paths(manifest)[1:]:
            break
    try:
        read = _read(tmp_path, manifest)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(tmp_path / "data" / "manifest.json"))
        return
    root = (tmp_path / "data").resolve()
    for split in read.splits.values():
        assert sum(s.num_samples for s in split.shards) == split.num_samples >= 0
        assert all((root / s.name).resolve().is_relative_to(root) for s in split.shards)


@pytest.mark.parametrize("root", ["custom_missing", "s3://bucket/x", "http://127.0.0.1:9/x", "data/{a,b}"])
def test_missing_or_url_root_is_one_line_and_writes_nothing(tmp_path: Path, root: str) -> None:
    given = str(tmp_path / root) if root == "custom_missing" else root
    result = run_cli(["train", f"data.root={given}", "data.num_workers=0", f"run.output_dir={tmp_path / 'runs'}",
                      *TINY], check=False, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith(f"error: data.root='{given}'"), result.stderr[-2000:]
    assert "does not exist" in lines[-1] or "names shards, not one of our folders; give WebDataset shards as " \
        "data.train=... data.val=..." in lines[-1]
    assert not (tmp_path / root).exists() and not (tmp_path / "runs").exists()
    assert not Path(root.split("/")[0]).exists() or root.startswith("data/")


def test_default_root_still_builds_the_demo(tmp_path: Path, monkeypatch) -> None:
    from pipeline.config import load_config
    from pipeline.run.preflight import builds_digits

    monkeypatch.chdir(tmp_path)
    assert builds_digits(load_config(None, []))
    assert not builds_digits(load_config(None, ["data.root=elsewhere"]))
    assert builds_digits(load_config(None, ["data.root=elsewhere", "data.auto_prepare_digits=true"]))
    assert not builds_digits(load_config(None, ["data.root=s3://b/x", "data.auto_prepare_digits=true"]))
