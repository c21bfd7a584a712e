"""Security: no tensor file can run code when loaded, and secrets never reach saved configs, logs or W&B."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import socket
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.checkpointing import Checkpointer
from pipeline.checkpointing.safe_load import load_tensors
from pipeline.config import load_config, to_yaml
from pipeline.config.secrets import MASK, is_secret_name, mask, mask_text, mask_url, mask_value
from pipeline.distributed import Dist
from tests.conftest import ROOT, TINY, run_cli


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_exploit(path: Path, marker: Path, torch_format: bool = True) -> None:
    if torch_format:  # a real torch zip file whose data.pkl holds the payload
        torch.save({"state": {}, "param_groups": [], "payload": _Exploit(marker)}, path)
    else:  # a bare pickle, as an old-style .pt would be
        path.write_bytes(pickle.dumps(_Exploit(marker)))


@pytest.mark.parametrize("torch_format", [True, False])
def test_load_tensors_refuses_pickled_code(tmp_path: Path, torch_format: bool) -> None:
    marker = tmp_path / "pwned"
    _write_exploit(tmp_path / "evil.pt", marker, torch_format)
    with pytest.raises(ValueError) as info:
        load_tensors(tmp_path / "evil.pt")
    message = str(info.value)
    assert not marker.exists()
    assert message.startswith(f"refusing to load '{tmp_path / 'evil.pt'}': it holds pickled objects other than "
                              "tensors, which could run code (torch.load weights_only=True)") and "\n" not in message


def test_every_torch_load_is_weights_only() -> None:
    """The only torch.load call in the package is the one in safe_load, with weights_only=True; no pickle.load."""
    calls = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr in ("load", "loads") \
                    and isinstance(func.value, ast.Name) and func.value.id in ("torch", "pickle"):
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((str(path.relative_to(ROOT)), func.value.id, safe))
    assert calls == [("pipeline/checkpointing/safe_load.py", "torch", True)]


def _reseal(folder: Path) -> None:
    """Rewrite COMPLETE so the tampered folder passes the integrity check (as a careful attacker would)."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size,
                                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps({"files": files}))


def test_resuming_from_a_poisoned_checkpoint_is_refused(tmp_path: Path) -> None:
    from accelerate import Accelerator

    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpointer = Checkpointer(tmp_path / "checkpoints", Dist(Accelerator(cpu=True)))
    folder = checkpointer.save("step-00000001", model, optimizer, scheduler, None, {"train": {}}, {"rng": None})
    marker = tmp_path / "pwned"
    _write_exploit(folder / "optimizer.pt", marker)
    _reseal(folder)
    assert checkpointer.latest() == folder  # it looks complete and intact...
    with pytest.raises(ValueError, match=r"refusing to load '.*optimizer\.pt': it holds pickled objects"):
        checkpointer.load(folder, model, optimizer, scheduler, None)
    assert not marker.exists()  # ...but its code never ran


def test_cli_refuses_poisoned_pretrained_weights(tmp_path: Path, digits_root: Path) -> None:
    marker = tmp_path / "pwned"
    _write_exploit(tmp_path / "weights.pt", marker)
    result = run_cli(["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={tmp_path}",
                      "run.name=p", *TINY, "train.epochs=1", f"finetune.weights={tmp_path / 'weights.pt'}"],
                     check=False, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to load '{tmp_path / 'weights.pt'}'"), lines
    assert not marker.exists()


# ---- secrets -------------------------------------------------------------------------------------------
def test_masking_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("PIPELINE_TUNE_STORAGE", "postgresql://bob:dbpass123@db:5432/optuna")
    assert mask_url("postgresql://alice:s3cret@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert mask_url("postgresql://alice:p@ss@db/x") == "postgresql://alice:***@db/x"  # '@' inside the password
    assert mask_url("sqlite:////tmp/a/study.db") == "sqlite:////tmp/a/study.db"
    assert mask_text("key " + "k" * 40 + " and dbpass123 and token=abc&x=1 password: hunter2") == \
        "key *** and *** and token=***&x=1 password: ***"
    assert mask({"tune": {"storage": "postgresql://u:pw@h/db", "db_password": "p", "api_key": 12,
                          "use_auth_key": True, "n_trials": 3, "tokenizer": "bert"}}) == \
        {"tune": {"storage": "postgresql://u:***@h/db", "db_password": "***", "api_key": "***",
                  "use_auth_key": True, "n_trials": 3, "tokenizer": "bert"}}


def test_saved_config_masks_url_passwords() -> None:
    cfg = load_config(None, ["logging.wandb_base_url=https://me:hunter2@wandb.example.com"])
    assert "hunter2" not in to_yaml(cfg) and "https://me:***@wandb.example.com" in to_yaml(cfg)
    assert cfg.logging.wandb_base_url == "https://me:hunter2@wandb.example.com"  # the run itself still has it


def _grep_tree(folder: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def test_secrets_never_reach_the_run_folder_or_the_console(tmp_path: Path, digits_root: Path) -> None:
    """A secret in an override (a W&B URL password) and in the environment (WANDB_API_KEY): after a whole run,
    including W&B's offline fallback, neither appears in any file of the run folder or in stdout/stderr."""
    api_key, password, db_password = "SeCrEtApIkEy" + "0" * 28, "PaSsW0rdInUrL", "DbPaSsInEnV"
    with socket.socket() as server:  # a W&B server that never answers: the run falls back to offline
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://wandbuser:{password}@127.0.0.1:{server.getsockname()[1]}"
        result = run_cli(["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={tmp_path}",
                          "run.name=s", *TINY, "train.epochs=1", "logging.wandb_mode=online",
                          f"logging.wandb_base_url={url}", "logging.wandb_init_timeout=2", "report.enabled=true"],
                         env={"WANDB_API_KEY": api_key, "NETRC": str(tmp_path / "none"),
                              "PIPELINE_TUNE_STORAGE": f"postgresql://u:{db_password}@db/x"}, timeout=300)
    run = tmp_path / "s"
    assert list((run / "wandb").glob("offline-run-*")), "W&B fell back to offline and kept its data"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any("W&B server http://wandbuser:***@127.0.0.1" in w and "logging offline" in w for w in warnings)
    assert "wandbuser:***@" in (run / "config.yaml").read_text()
    secrets = [api_key, password, db_password]
    assert _grep_tree(run, secrets) == []
    assert not [s for s in secrets if s in result.stdout or s in result.stderr]


# ---- URL passwords with any character (property-based) -------------------------------------------------
_PLAIN = "abcxyz0123456789"
"""Letters that cannot spell a secret key name (so text built from them has nothing else to mask)."""
_plain = st.text(_PLAIN, min_size=1, max_size=8)
_passwords = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=24)
"""Any printable ASCII: / # ? @ % : = quotes and spaces included."""


@st.composite
def _url_parts(draw: st.DrawFn) -> dict[str, str]:
    """The pieces of a URL around its userinfo: http, https, s3 or postgresql, with or without port, path, query."""
    host = draw(_plain) + draw(st.sampled_from(["", ".com", ".example.org"]))
    port = draw(st.sampled_from(["", ":443", ":5432", ":8080"]))
    path = "".join("/" + segment for segment in draw(st.lists(st.text(_PLAIN + "%-._", max_size=6), max_size=3)))
    query = draw(st.sampled_from(["", "?x=1", "?a=b&c=d0", "#frag"]))
    return {"scheme": draw(st.sampled_from(["http", "https", "s3", "postgresql"])), "user": draw(_plain),
            "rest": host + port + path + query}


def _url(parts: dict[str, str], password: str | None) -> str:
    userinfo = parts["user"] + ("" if password is None else ":" + password) + "@"
    return f"{parts['scheme']}://{userinfo}{parts['rest']}"


@st.composite
def _words(draw: st.DrawFn) -> str:
    """Password-free free text: plain words, e-mail addresses, metrics and URLs without a password."""
    piece = st.one_of(_plain, st.builds("{}@{}.com".format, _plain, _plain), st.builds("loss={}".format, _plain),
                      st.builds(_url, _url_parts(), st.none()),
                      st.builds(lambda p: f"{p['scheme']}://{p['rest']}", _url_parts()))
    return " ".join(draw(st.lists(piece, max_size=4)))


def _no_env_secrets() -> mock._patch:
    """The environment without secret-looking variables, so only the text under test decides what is masked."""
    return mock.patch.dict(os.environ, {k: v for k, v in os.environ.items() if not is_secret_name(k)}, clear=True)


def _assert_hidden(out: str, expected: str, password: str) -> None:
    """`out` is the masked text expected, so neither the password nor its percent-encoded form is left in it
    (unless the text around the URL happens to hold that string by itself)."""
    assert out == expected
    for form in {password, quote(password, safe="")}:
        assert form in expected or form not in out


@settings(max_examples=300, deadline=None)
@given(parts=_url_parts(), password=_passwords, encoded=st.booleans(), data=st.data())
def test_url_passwords_with_any_character_are_masked_in_free_text(parts: dict, password: str, encoded: bool,
                                                                  data: st.DataObject) -> None:
    """A URL inside a log line or error message: its password, raw or percent-encoded, is masked up to the URL's
    last `@`; a raw password with a space is masked once the URL is known (here: a command-line argument)."""
    in_url = quote(password, safe="") if encoded else password
    before, after = data.draw(_words()), data.draw(_words())
    text = f"{before} {_url(parts, in_url)} {after}"
    argv = ["pipeline", f"logging.wandb_base_url={_url(parts, in_url)}"] if " " in in_url else ["pipeline"]
    with _no_env_secrets(), mock.patch.object(sys, "argv", argv):
        _assert_hidden(mask_text(text), f"{before} {_url(parts, MASK)} {after}", password)


@settings(max_examples=300, deadline=None)
@given(parts=_url_parts(), password=_passwords, encoded=st.booleans())
def test_url_passwords_with_any_character_are_masked_in_config_values(parts: dict, password: str,
                                                                      encoded: bool) -> None:
    """A config value or `key=URL` argument is one URL, raw spaces and all; once masked, the same URL is masked in
    any later text too (an error message quoting it), even where a space splits its password."""
    url, masked = _url(parts, quote(password, safe="") if encoded else password), _url(parts, MASK)
    config = {"logging": {"wandb_base_url": url}, "data": {"urls": [url, url]}, "n": 3}
    with _no_env_secrets(), mock.patch.object(sys, "argv", ["pipeline"]):
        out = mask(config)
        assert out == {"logging": {"wandb_base_url": masked}, "data": {"urls": [masked, masked]}, "n": 3}
        _assert_hidden(mask_value(f"logging.wandb_base_url={url}"), f"logging.wandb_base_url={masked}", password)
        _assert_hidden(mask_text(f"error: cannot reach '{url}' now"), f"error: cannot reach '{masked}' now",
                       password)


@settings(max_examples=300, deadline=None)
@given(parts=_url_parts(), with_user=st.booleans(), data=st.data())
def test_password_free_text_and_configs_are_left_as_they_are(parts: dict, with_user: bool,
                                                             data: st.DataObject) -> None:
    """Masking changes nothing without a password: URLs with a user but no password, ports, paths, queries,
    e-mail addresses, in free text and as config values (a value that starts with a URL is one URL)."""
    text, url = data.draw(_words()), _url(parts, None) if with_user else f"{parts['scheme']}://{parts['rest']}"
    with _no_env_secrets(), mock.patch.object(sys, "argv", ["pipeline"]):
        assert mask_text(text) == text
        assert mask_value(url) == url and mask_value(f"data.root={url}") == f"data.root={url}"
        assert mask({"a": url, "b": [url], "c": f"note: {text}"}) == {"a": url, "b": [url], "c": f"note: {text}"}


@pytest.mark.parametrize("encoded", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["raw", "percent-encoded"])
def test_url_password_with_any_character_never_reaches_the_run_folder(tmp_path: Path, digits_root: Path,
                                                                       encoded: bool) -> None:
    """A W&B URL whose password holds / # ? @ % and a space, given on the command line (stored verbatim in the
    config): after a whole offline run with a report, no file under the run folder (config.yaml, metrics.jsonl,
    report.html, W&B's debug logs and binary .wandb file) and neither stdout nor stderr holds it, raw or encoded."""
    password = "Pw/x#y?z@w%2Fq s"
    in_url = quote(password, safe="") if encoded else password
    url = f"https://wandbuser:{in_url}@wandb.example.com:8443/base?region=eu"
    result = run_cli(["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={tmp_path}",
                      "run.name=s", *TINY, "train.epochs=1", "data.num_workers=0", "logging.wandb_mode=offline",
                      f"logging.wandb_base_url={url}", "report.enabled=true"], timeout=300)
    run = tmp_path / "s"
    wandb_files = [p.name for p in (run / "wandb").rglob("*") if p.is_file()]
    assert "debug.log" in wandb_files and any(n.endswith(".wandb") for n in wandb_files), wandb_files
    assert "https://wandbuser:***@wandb.example.com:8443/base?region=eu" in (run / "config.yaml").read_text()
    # the .wandb file holds the masked config and the masked command line W&B records (masked, not dropped)
    records = next((run / "wandb").rglob("*.wandb")).read_bytes()
    assert records.count(b"https://wandbuser:***@wandb.example.com:8443/base?region=eu") >= 2
    assert b"logging.wandb_base_url=https://wandbuser:***@wandb.example.com" in records
    forms = [password, quote(password, safe=""), quote(quote(password, safe=""), safe="")]
    assert _grep_tree(run, forms) == []
    assert not [f for f in forms if f in result.stdout or f in result.stderr]
