"""`pipeline tune`: one worker of a study. Run it once, or N times in parallel against one database.

Each worker loops: (under the study lock) fail trials whose worker died, check the budget, ask
Optuna for a trial; train it as an ordinary run in <study>/trials/trial-NNNN/ with a callback that
reports every epoch for pruning; tell Optuna the result. Under `accelerate launch` only the main
process talks to the database and broadcasts the trial's parameters to the other ranks.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
from optuna.trial import TrialState

from pipeline.commands.train import train
from pipeline.commands.tune.config import load_tune_config
from pipeline.commands.tune.pruning import MetricNotInRecord, TrialReporter
from pipeline.commands.tune.report import write_report
from pipeline.commands.tune.space import SearchSpace, apply_overrides
from pipeline.commands.tune.storage import build_storage, check_url, mask_url, study_lock
from pipeline.config import Config, to_yaml
from pipeline.config.schema import TuneConfig
from pipeline.config.secrets import mask
from pipeline.distributed import build_dist
from pipeline.errors import first_line
from pipeline.run_folder import RunFolder

BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler calls study.stop() when the grid is used up, which only works inside study.optimize;
    this worker checks `is_exhausted` itself."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        pass


def build_sampler(tune: TuneConfig, space: SearchSpace, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded per worker and per restart: a worker that joins a study with trials in it must not replay
    the random draws of the worker that started it (same seed, same first points)."""
    seed = tune.seed + tune.worker_index + 1000 * trials_so_far
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "grid":
        return _GridSampler(space.grid(), seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.sampler_startup_trials)


def build_pruner(tune: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                           n_warmup_steps=tune.pruner_warmup_epochs + 1)  # epochs are 1-based
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tune.pruner_warmup_epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


class Heartbeat:
    """Records the running trial's heartbeat every `interval` seconds from a daemon thread."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@dataclass
class Job:
    """What every rank needs to run one trial."""

    number: int
    overrides: dict[str, Any]
    retry_of: Optional[int] = None


class StudyWorker:
    """The main process's side: storage, study, budget, ask/tell."""

    def __init__(self, tune: TuneConfig, base: Config, space: SearchSpace):
        self.tune, self.base, self.space = tune, base, space
        self.url = tune.storage_url()
        check_url(self.url)
        self.sampler = build_sampler(tune, space)
        # Opening the storage creates Optuna's tables on a fresh database; like create_study, it races
        # between workers starting together (duplicate-key errors), so both happen under the study lock.
        with self.lock():
            self.storage = build_storage(self.url, tune.heartbeat_s, tune.grace_s, tune.max_retries)
            self.study = optuna.create_study(storage=self.storage, study_name=tune.study_name,
                                             direction=tune.direction, sampler=self.sampler,
                                             pruner=build_pruner(tune, base.train.epochs), load_if_exists=True)
        existing = len(self.study.get_trials(deepcopy=False))
        if existing:
            self.sampler = self.study.sampler = build_sampler(tune, space, existing)
        if self.study.direction.name.lower() != tune.direction:
            raise ValueError(f"study '{tune.study_name}' in {mask_url(self.url)} already exists with direction "
                             f"{self.study.direction.name.lower()}; tune.direction={tune.direction} does not match")
        self.started = time.monotonic()
        self.trial: Optional[optuna.Trial] = None

    def lock(self):
        return study_lock(self.url, self.tune.study_name, self.tune.study_dir)

    def budget_left(self) -> Optional[str]:
        """None if another trial may start, else why not."""
        if self.tune.timeout_s is not None and time.monotonic() - self.started >= self.tune.timeout_s:
            return f"timeout of {self.tune.timeout_s:g}s reached"
        counted = len(self.study.get_trials(deepcopy=False, states=BUDGET_STATES))
        if self.tune.n_trials is not None and counted >= self.tune.n_trials:
            return f"the study has its {self.tune.n_trials} trials (complete, pruned or running)"
        if isinstance(self.sampler, optuna.samplers.GridSampler) and self.sampler.is_exhausted(self.study):
            return "every grid point has been tried"
        return None

    def next_job(self) -> Optional[Job]:
        with self.lock():
            optuna.storages.fail_stale_trials(self.study)  # trials of dead workers: FAIL, re-enqueued as WAITING
            why = self.budget_left()
            if why is not None:
                print(f"no new trial: {why}", flush=True)
                return None
            trial = self.study.ask()
        self.trial = trial
        retry_of = self.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        overrides = trial.user_attrs.get("overrides")
        if overrides is None:  # a fresh trial (a retried one keeps its parameters and overrides)
            overrides = self.space.suggest(trial)
            trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("worker_index", self.tune.worker_index)
        return Job(trial.number, overrides, retry_of)

    def heartbeat(self) -> Heartbeat:
        """Beats for the trial `next_job` asked for while it runs (`with worker.heartbeat(): ...`)."""
        return Heartbeat(self.storage, self.trial._trial_id, self.tune.heartbeat_s)

    def summary(self) -> dict:
        """Write the study's report (summary.md, trials.csv, best config); return its summary."""
        with self.lock():
            return write_report(self.study, self.tune, self.base)

    def tell(self, state: TrialState, value: Optional[float], seconds: float, error: str = "") -> None:
        trial, self.trial = self.trial, None
        trial.set_user_attr("seconds", round(seconds, 3))
        if error:
            trial.set_user_attr("error", error[:500])
        if state == TrialState.COMPLETE and value is None:
            state, error = TrialState.FAIL, "no finite metric value"
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)


class Follower:
    """A rank other than the main process: it trains the trials the main process hands out and talks to no study."""

    trial = None

    def next_job(self) -> None:  # never called: the main process's job is broadcast (Dist.on_main)
        return None

    def heartbeat(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def tell(self, *result: object) -> None:
        pass

    def summary(self) -> dict:
        return {}


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / "trials" / f"trial-{number:04d}"


def _continue_from(study_dir: Path, job: Job) -> None:
    """A retried trial starts from the checkpoints its dead worker left (same parameters, new number)."""
    old, new = trial_dir(study_dir, job.retry_of), trial_dir(study_dir, job.number)
    if RunFolder(old).checkpoints.is_dir() and not new.exists():
        shutil.copytree(old, new)


def run_trial(job: Job, tune: TuneConfig, base: Config,
              trial: Optional[optuna.Trial]) -> tuple[TrialState, Optional[float], str]:
    """Train one trial on every rank; returns (state, value, error) on every rank."""
    cfg = apply_overrides(base, job.overrides, output_dir=str(tune.study_dir / "trials"),
                          name=trial_dir(tune.study_dir, job.number).name)
    reporter = TrialReporter(trial, tune.metric, tune.direction)
    try:
        train(cfg, [reporter])
    except optuna.TrialPruned:
        return TrialState.PRUNED, None, ""
    return TrialState.COMPLETE, reporter.best, ""


def shown_overrides(overrides: dict) -> str:
    """A trial's overrides for people: floats at 12 significant digits (a step of 0.1 gives 0.30000000000000004,
    shown 0.3); the config gets Optuna's value unchanged."""
    return str({k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in overrides.items()})


def tune_study(config_path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Run one worker of the study described by the tuning file; return the study summary (main process)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "[I ...] Trial 0 finished" repeats our trial lines
    tune, base = load_tune_config(config_path, overrides)
    space = SearchSpace(tune.space, base)
    dist = build_dist(base.train.precision, base.train.cpu)
    # Only the main process talks to the study; `dist.on_main` makes its failures every rank's failure (no rank
    # is left waiting in a collective for one that has gone). The other ranks hold a Follower.
    worker = dist.on_main(lambda: _open_worker(tune, base, space), share=False) or Follower()
    failures = 0
    while (job := dist.on_main(worker.next_job)) is not None:
        state, error = run_job(job, worker, tune, base, dist)
        failures = failures + 1 if state == TrialState.FAIL else 0
        if failures >= tune.max_consecutive_failures:
            raise ValueError(f"{failures} trials failed in a row (last: {error}); see {tune.study_dir}/summary.md")
        dist.barrier()
    summary = worker.summary()
    dist.barrier()
    return summary


def run_job(job: Job, worker: "StudyWorker | Follower", tune: TuneConfig, base: Config, dist) -> tuple[TrialState, str]:
    """One trial on every rank, announced and told by the main process; (state, error) on every rank."""
    if dist.is_main:
        _announce(job, tune.study_dir)
    dist.barrier()
    started = time.monotonic()
    state, value, error = _attempt(job, worker, tune, base, started)
    dist.on_main(functools.partial(worker.tell, state, value, time.monotonic() - started, error))
    if dist.is_main:
        detail = f" {tune.metric}={value:.4f}" if value is not None else f" {error}" if error else ""
        print(f"trial {job.number}: {state.name.lower()}{detail}", flush=True)
    return state, error


def _announce(job: Job, study_dir: Path) -> None:
    retry = f" (retry of trial {job.retry_of})" if job.retry_of is not None else ""
    print(f"trial {job.number}: {shown_overrides(job.overrides)}{retry}", flush=True)
    if job.retry_of is not None:
        _continue_from(study_dir, job)


def _attempt(job: Job, worker: "StudyWorker | Follower", tune: TuneConfig, base: Config,
             started: float) -> tuple[TrialState, Optional[float], str]:
    """`run_trial` with the main process's heartbeat beating. A failed trial is a result, and the study goes on;
    but a metric the record lacks is a setting to fix: that trial is told, then the worker stops."""
    with worker.heartbeat():
        try:
            return run_trial(job, tune, base, worker.trial)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, the study goes on
            error = first_line(exc, typed=True)
            if isinstance(exc, MetricNotInRecord):
                worker.tell(TrialState.FAIL, None, time.monotonic() - started, error)
                raise
            return TrialState.FAIL, None, error


def check_base(tune: TuneConfig, base: Config) -> None:
    """Before the study is opened and any trial exists: the base config's data is there (the checks `pipeline
    train` makes first), and a study that already ran keeps the base config it began with. Otherwise every trial
    would fail (and stay in the study as failed for ever), or later trials would be compared with earlier ones
    trained on other settings. Changes a resume may make (logging, workers, ...) are only noted."""
    import yaml

    from pipeline.data.dataset.resolve import dataset_manifest
    from pipeline.run.guards import config_changes, is_harmless
    from pipeline.run.preflight import check_data_root

    check_data_root(base)
    dataset_manifest(base.data)  # shards readable, classes known (an index comes from its cache)
    saved = tune.study_dir / "base_config.yaml"
    if not saved.is_file():
        return
    changes = config_changes(yaml.safe_load(saved.read_text()), yaml.safe_load(to_yaml(base)), None, 1)
    refused = [c for c in changes if not is_harmless(*c)]
    described = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in (refused or changes))
    if refused:
        raise ValueError(f"study '{tune.study_name}' began with another base config ({saved}): {described}; rerun "
                         f"with the same config and overrides, or start a new study (tune.study_name=...)")
    if changes:
        print(f"study '{tune.study_name}': base config changed where it does not matter: {described}", flush=True)


def _open_worker(tune: TuneConfig, base: Config, space: SearchSpace) -> "StudyWorker":
    check_base(tune, base)
    tune.study_dir.mkdir(parents=True, exist_ok=True)
    worker = StudyWorker(tune, base, space)
    _save_settings(tune, base)
    print(f"study '{tune.study_name}' in {mask_url(worker.url)}: folder {tune.study_dir}, "
          f"sampler {tune.sampler}, pruner {tune.pruner}, worker {tune.worker_index}", flush=True)
    return worker


def _save_settings(tune: TuneConfig, base: Config) -> None:
    """The study's tune section (password masked) and base config, for the record."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.structured(tune))
    settings["storage"] = mask_url(tune.storage_url())
    (tune.study_dir / "tune.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"tune": mask(settings)})))
    (tune.study_dir / "base_config.yaml").write_text(to_yaml(base))

