"""Hyperparameter search: the search space, the study folder, pruning, restart after a dead worker,
and two parallel workers against a real PostgreSQL (tests/services/start_postgres.sh)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.commands.cli import main as cli_main
from pipeline.commands.tune import SearchSpace, apply_overrides, load_tune_config
from pipeline.commands.tune.storage import build_storage, mask_url
from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
POSTGRES_ENV = "PIPELINE_TEST_POSTGRES_URL"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from pipeline.data.writer.shards import ensure_digits_shards

    root = tmp_path_factory.mktemp("digits") / "shards"
    ensure_digits_shards(root)
    return root


def tiny_tuning_file(folder: Path, shards: Path, tune: dict, **base: dict) -> Path:
    """A tuning YAML whose trials take a second or two on a CPU."""
    data = {
        "data": {"root": str(shards), "image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "num_workers": 0},
        "model": {"channels": [8, 16]},
        "optim": {"name": "adamw", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 64, "cpu": True, "seed": 0},
        "logging": {"wandb_mode": "disabled", "progress": False},
        "tune": {"output_dir": str(folder / "studies"), "study_name": "tiny", **tune},
    }
    for section, values in base.items():
        data[section] = {**data.get(section, {}), **values}
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def best_val_accuracy(run_dir: Path) -> float:
    return max(json.loads(line)["val/accuracy"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())


# ---- search space and settings: no training ---------------------------------------------------------
SPACE = {
    "optim.name": {"type": "categorical", "choices": ["sgd", "adamw"]},
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "optim.momentum": {"type": "float", "low": 0.5, "high": 0.99, "when": {"optim.name": "sgd"}},
    "train.batch_size": {"low": 16, "high": 128, "step": 16},
    "model.channels": {"choices": [[8, 16], [16, 32, 64]]},
}


def test_space_draws_every_key_and_conditionals_only_when_they_apply():
    space = SearchSpace(SPACE, load_config())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    names = []
    for _ in range(20):
        trial = study.ask()
        overrides = space.suggest(trial)
        study.tell(trial, 0.0)
        names.append(overrides["optim.name"])
        assert ("optim.momentum" in overrides) == (overrides["optim.name"] == "sgd")
        assert 1e-4 <= overrides["optim.lr"] <= 1e-1
        assert overrides["train.batch_size"] in range(16, 129, 16)
        assert overrides["model.channels"] in ([8, 16], [16, 32, 64])
        cfg = apply_overrides(load_config(), overrides, name="t")
        assert cfg.model.channels == overrides["model.channels"] and cfg.run.name == "t"
    assert set(names) == {"sgd", "adamw"}


def test_grid_lists_every_point():
    space = SearchSpace({"model.dropout": {"low": 0.0, "high": 0.3, "step": 0.1},
                         "optim.name": {"choices": ["sgd", "adam"]}}, load_config())
    assert space.grid() == {"model.dropout": [0.0, 0.1, 0.2, 0.3], "optim.name": ["sgd", "adam"]}


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"low": 0.1, "high": 1.0}}, "tune.space.optim.lrr: 'optim.lrr' is not a config value"),
    ({"optim": {"low": 0.1, "high": 1.0}}, "tune.space.optim: 'optim' is not a config value"),
    ({"optim.lr": {"low": 0.0, "high": 1.0, "log": True}}, "tune.space.optim.lr: log=true needs low > 0 and no step"),
    ({"optim.lr": {"low": 1.0, "high": 0.1}}, "tune.space.optim.lr: low=1.0 is larger than high=0.1"),
    ({"optim.lr": {"low": 0.1, "hi": 1.0}}, "tune.space.optim.lr: unknown field(s) hi; valid: choices, high, log, low"),
    ({"optim.name": {"type": "cat", "choices": ["sgd"]}}, "tune.space.optim.name: type='cat' is not valid"),
    ({"optim.momentum": {"low": 0.1, "high": 0.9, "when": {"optim.nam": "sgd"}}},
     "tune.space.optim.momentum: `when` names 'optim.nam', which is not a config key"),
])
def test_bad_space_is_one_line_naming_the_key(space, message):
    with pytest.raises(ConfigError) as info:
        SearchSpace(space, load_config())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_grid_of_a_float_range_needs_a_step():
    with pytest.raises(ConfigError, match=r"tune.space.optim.lr: sampler=grid needs a `step`"):
        SearchSpace({"optim.lr": {"low": 0.1, "high": 1.0}}, load_config()).grid()


def test_tuning_file_splits_into_tune_settings_and_base_config(tmp_path, shards):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"epochs": 7}, "optim": {"lr": 0.5}}))
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 0.2}, "tune": {"base_config": "base.yaml", "space": SPACE}},
                                  sort_keys=False))
    tune, cfg = load_tune_config(path, ["tune.n_trials=3", "train.batch_size=8"])
    assert (tune.n_trials, tune.sampler, tune.study_dir) == (3, "tpe", Path("runs/tune/study"))
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.batch_size) == (7, 0.2, 8)  # base <- file <- command line
    assert list(tune.space) == list(SPACE)  # file order is kept (conditions are drawn first anyway)


def test_condition_is_drawn_before_the_parameter_it_gates_whatever_the_file_order():
    space = SearchSpace({"optim.momentum": SPACE["optim.momentum"], "optim.name": SPACE["optim.name"]}, load_config())
    assert [p.key for p in space.params] == ["optim.name", "optim.momentum"]


def test_storage_password_is_masked():
    assert mask_url("postgresql://alice:s3cret@db.example:5432/optuna") == "postgresql://alice:***@db.example:5432/optuna"
    assert mask_url("sqlite:////tmp/x/study.db") == "sqlite:////tmp/x/study.db"


@pytest.mark.parametrize("tune, message", [
    ({"space": SPACE, "sampler": "bayes"}, "error: tune.sampler='bayes' is not valid; choose one of tpe, random, grid"),
    ({"space": {}}, "error: tune.space is empty"),
    ({"space": SPACE, "n_trials": None, "timeout_s": None}, "error: tune.n_trials and tune.timeout_s are both null"),
    ({"space": SPACE, "storage": "postgresql://u:pw@127.0.0.1:1/x"},
     "error: cannot open study storage postgresql://u:***@127.0.0.1:1/x"),
])
def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, shards, capsys, tune, message):
    path = tiny_tuning_file(tmp_path, shards, tune)
    assert cli_main(["tune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1 and "pw@" not in err


def test_cli_tuning_file_without_tune_section(tmp_path, capsys):
    path = tmp_path / "plain.yaml"
    path.write_text("train:\n  epochs: 1\n")
    assert cli_main(["tune", str(path)]) == 2
    assert capsys.readouterr().err == f"error: tuning file '{path}' has no 'tune:' section (with at least tune.space)\n"


# ---- a real study -----------------------------------------------------------------------------------
@pytest.mark.slow  # 3 minutes on a busy 2-core CPU; .ci/run runs slow tests too
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_study_prunes_writes_best_config_that_retrains_and_restart_continues(tmp_path, shards):
    # lr 1e-6 never learns, so once one good trial is complete such trials are pruned after epoch 1.
    tune = {"sampler": "random", "pruner": "median", "n_trials": 4, "pruner_startup_trials": 1,
            "pruner_warmup_epochs": 0, "heartbeat_s": 1, "grace_s": 2,
            "space": {"optim.lr": {"choices": [0.02, 1e-6]}, "model.dropout": {"low": 0.0, "high": 0.2, "step": 0.1}}}
    path = tiny_tuning_file(tmp_path, shards, tune, train={"epochs": 2})
    done = run_cli("tune", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    study_dir = tmp_path / "studies" / "tiny"
    summary = json.loads((study_dir / "study.json").read_text())
    states = summary["states"]
    assert summary["numbers"] == [0, 1, 2, 3]
    assert states["complete"] + states["pruned"] == 4 and states["fail"] == 0
    assert states["pruned"] >= 1
    # A pruned trial shows its last epoch line, then why it stopped; the console summary is text, not Markdown.
    lines = done.stdout.splitlines()
    pruned_at = [i for i, line in enumerate(lines) if line.startswith("pruned at epoch 1:")]
    assert len(pruned_at) == states["pruned"]
    assert all(lines[i - 1].startswith("epoch 1/2  loss ") for i in pruned_at), done.stdout
    assert "![" not in done.stdout and "`" not in done.stdout
    assert f"plot: {tmp_path / 'studies' / 'tiny' / 'optimization_history.png'}" in lines
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    for trial in study.trials:
        run_dir = study_dir / "trials" / f"trial-{trial.number:04d}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == trial.params["optim.lr"]
        if trial.state == TrialState.PRUNED:
            assert trial.params["optim.lr"] == 1e-6
            assert [r["epoch"] for r in records] == [1] and records[-1]["pruned"] is True
            assert not (run_dir / "test_metrics.json").exists()
        else:
            assert [r["epoch"] for r in records] == [1, 2]
            assert trial.value == max(r["val/accuracy"] for r in records)
            assert trial.intermediate_values == {r["epoch"]: r["val/accuracy"] for r in records}
    for name in ("best_config.yaml", "summary.md", "trials.csv", "tune.yaml", "base_config.yaml",
                 "optimization_history.png"):
        assert (study_dir / name).is_file(), name
    assert summary["best_value"] == study.best_value and summary["best_trial"] == study.best_trial.number
    table = (study_dir / "summary.md").read_text()
    assert f"| {study.best_trial.number} | complete | {study.best_value:.4f} | 2 |" in table

    # The best YAML trains as an ordinary run and reproduces the trial's metric exactly.
    retrain = run_cli("train", str(study_dir / "best_config.yaml"), f"run.output_dir={tmp_path / 'retrain'}")
    assert retrain.returncode == 0, retrain.stderr[-2000:]
    assert best_val_accuracy(tmp_path / "retrain" / "tiny-best") == study.best_value

    # A worker dies mid-trial (its trial stays RUNNING, heartbeats stop); a restarted study fails that
    # trial, retries its parameters under a new number and goes on counting up to the new budget.
    storage = build_storage(f"sqlite:///{study_dir / 'study.db'}", heartbeat_s=1, grace_s=2, max_retries=1)
    crashed = optuna.load_study(study_name="tiny", storage=storage)
    dead = crashed.ask({"optim.lr": optuna.distributions.CategoricalDistribution([0.02, 1e-6]),
                        "model.dropout": optuna.distributions.FloatDistribution(0.0, 0.2, step=0.1)})
    dead.set_user_attr("overrides", dict(dead.params))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3)
    again = run_cli("tune", str(path), "tune.n_trials=6")
    assert again.returncode == 0, again.stderr[-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    numbers = [t.number for t in study.trials]
    assert numbers == [0, 1, 2, 3, 4, 5, 6]
    assert study.trials[4].state == TrialState.FAIL
    retried = study.trials[5]
    assert retried.system_attrs["failed_trial"] == 4 and retried.params == study.trials[4].params
    assert retried.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert study.trials[6].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert f"trial 5: {retried.user_attrs['overrides']} (retry of trial 4)" in again.stdout
    assert "no new trial: the study has its 6 trials" in again.stdout
    assert json.loads((study_dir / "study.json").read_text())["numbers"] == numbers


def test_tune_checks_the_base_config_and_data_before_any_trial(tmp_path, shards):
    """A rerun whose data is missing, or whose base config differs from the study's, stops with one line (exit 2)
    before a trial is created: no failed trials left in the study for ever."""
    tune = {"sampler": "random", "n_trials": 1, "space": {"optim.lr": {"choices": [0.02]}}}
    path = tiny_tuning_file(tmp_path, shards, tune, train={"epochs": 1})
    first = run_cli("tune", str(path))
    assert first.returncode == 0, first.stderr[-2000:]
    db = tmp_path / "studies" / "tiny" / "study.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    cases = {f"data.root={tmp_path / 'gone'}": f"data.root='{tmp_path / 'gone'}' does not exist",
             "model.dropout=0.3": "study 'tiny' began with another base config"}
    for override, message in cases.items():
        started = time.monotonic()
        done = run_cli("tune", str(path), override, "tune.n_trials=3")
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.startswith("error: ") and message in done.stderr.splitlines()[0], done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "model.dropout 0.0 -> 0.3" in done.stderr or "dropout" not in override
        assert time.monotonic() - started < 60
        assert "trial " not in done.stdout
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # not one trial (nor anything else) added
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    # Settings a resume may change are no reason to refuse: the study goes on.
    again = run_cli("tune", str(path), "train.log_every_steps=5", "tune.n_trials=2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "base config changed where it does not matter: train.log_every_steps 20 -> 5" in again.stdout


# ---- two workers, one PostgreSQL study --------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get(POSTGRES_ENV),
                    reason=f"{POSTGRES_ENV} is not set: start a server with "
                           f"eval \"$(tests/services/start_postgres.sh)\" (needs Debian's postgresql package)")
def test_two_workers_share_one_postgres_study(tmp_path, shards):
    url = os.environ[POSTGRES_ENV]
    name = f"pg-{uuid.uuid4().hex[:8]}"
    tune = {"study_name": name, "sampler": "tpe", "pruner": "none", "n_trials": 4,
            "space": {"optim.lr": {"low": 1e-3, "high": 0.05, "log": True}}}
    path = tiny_tuning_file(tmp_path, shards, tune, train={"epochs": 1})
    env = {**os.environ, "PIPELINE_TUNE_STORAGE": url}  # the URL (and its password) stays off the command line
    workers = [subprocess.Popen([sys.executable, "-m", "pipeline", "tune", str(path), f"tune.worker_index={i}"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name=name, storage=url)
    numbers = [t.number for t in study.trials]
    assert len(study.trials) == 4
    assert sorted(numbers) == list(range(4)) and len(set(numbers)) == 4
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert {t.user_attrs["worker_index"] for t in study.trials} == {0, 1}
    assert sorted(p.name for p in (tmp_path / "studies" / name / "trials").iterdir()) == \
        [f"trial-{n:04d}" for n in range(4)]
    password = optuna.storages.RDBStorage(url).engine.url.password
    for out, err in outputs:
        assert password not in out and password not in err
    for file in (tmp_path / "studies" / name).glob("*.*"):
        if file.suffix in (".yaml", ".json", ".md", ".csv"):
            assert password not in file.read_text(), file
    assert "postgresql://pipeline:***@" in (tmp_path / "studies" / name / "tune.yaml").read_text()


# ---- a trial spread over two ranks (accelerate launch, gloo on the CPU) -----------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_trials_under_accelerate_launch_get_one_set_of_parameters(tmp_path, shards):
    # Different model.channels on the two ranks would make DDP fail at prepare (parameter shapes differ),
    # so finishing at all shows the ranks built the same trial; only rank 0 asks Optuna and prints.
    tune = {"sampler": "random", "pruner": "median", "n_trials": 2,
            "space": {"model.channels": {"choices": [[8, 16], [16, 32]]}, "optim.lr": {"low": 1e-3, "high": 0.05}}}
    path = tiny_tuning_file(tmp_path, shards, tune, train={"epochs": 2})
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", str(port), "-m", "pipeline", "tune",
                           str(path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = tmp_path / "studies" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert done.stdout.count("trial 0: {") == 1 and done.stdout.count("trial 1: {") == 1
    for trial in study.trials:
        run_dir = study_dir / "trials" / f"trial-{trial.number:04d}"
        assert "2 process(es) on cpu" in done.stdout
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert str(saved["model"]["channels"]).replace(" ", "") == trial.params["model.channels"].replace(" ", "")


@pytest.mark.distributed
def test_unreachable_storage_under_accelerate_launch_stops_every_rank_with_one_line(tmp_path, shards):
    # Only rank 0 opens the study; when it cannot, rank 1 must not wait for it in a collective until a timeout.
    password = "s3cret-pw"
    tune = {"n_trials": 1, "storage": f"postgresql://pipeline:{password}@127.0.0.1:1/nowhere",
            "space": {"optim.lr": {"low": 1e-3, "high": 0.05}}}
    path = tiny_tuning_file(tmp_path, shards, tune)
    from tests.conftest import free_port

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "pipeline", "tune",
                           str(path)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and time.monotonic() - started < 60
    # One line from each rank (they may interleave on the shared stderr).
    assert done.stderr.count("error: cannot open study storage postgresql://pipeline:***@127.0.0.1:1/nowhere") == 2
    # accelerate's launcher prints its own traceback (CalledProcessError) when a rank fails; none from our code.
    assert password not in done.stderr + done.stdout and "pipeline/" not in done.stderr


def test_trial_overrides_are_shown_with_short_floats():
    from pipeline.commands.tune.study import shown_overrides

    assert shown_overrides({"model.dropout": 0.30000000000000004, "train.batch_size": 16, "optim.name": "sgd"}) == \
        "{'model.dropout': 0.3, 'train.batch_size': 16, 'optim.name': 'sgd'}"


@pytest.mark.slow  # a real one-trial study in a subprocess (~30 s on a busy 2-core CPU)
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_trial_lines_show_short_floats_and_optuna_stays_quiet(tmp_path, shards):
    tune = {"sampler": "grid", "n_trials": 1, "space": {"model.dropout": {"choices": [0.30000000000000004]}}}
    done = run_cli("tune", str(tiny_tuning_file(tmp_path, shards, tune, train={"epochs": 1})))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trial 0: {'model.dropout': 0.3}" in done.stdout.splitlines()
    assert "[I " not in done.stderr and "Trial 0 finished" not in done.stderr + done.stdout
