"""The study database: URL handling (passwords masked), a cross-worker lock, Optuna's RDB storage.

Several workers (SLURM array tasks on several nodes) share one study. Two things must not race:
creating the tables/study, and "is the trial budget spent? if not, start a trial". Both run under
`study_lock`: a PostgreSQL advisory lock when the database is PostgreSQL, else an flock on a file
in the study folder (SQLite lives there; workers share that folder anyway for the trial folders).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import warnings
from pathlib import Path
from typing import Iterator

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from pipeline.config.secrets import mask_url
from pipeline.errors import first_line

# Heartbeats, stale-trial failing and retries are "experimental" in Optuna, and it expects heartbeats
# only under Study.optimize; we drive them ourselves (ask/tell under the budget lock) on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def check_url(url: str) -> None:
    """One-line error for URLs that cannot work, before any worker starts."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        raise ValueError(f"tune.storage={mask_url(url)!r} is not a database URL "
                         "(e.g. sqlite:///study.db or postgresql://user@host:5432/db)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        folder = Path(parsed.database).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"tune.storage: folder '{folder}' for the SQLite file does not exist")


def _is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def storage_error(url: str, exc: Exception) -> ValueError:
    """One line for a storage that cannot be reached or opened, with the password masked."""
    message = first_line(exc)
    return ValueError(f"cannot open study storage {mask_url(url)}: {message.replace(url, mask_url(url))}")


@contextlib.contextmanager
def study_lock(url: str, study_name: str, study_dir: Path) -> Iterator[None]:
    """Exclusive across every worker of this study while the block runs."""
    if _is_postgres(url):
        key = int.from_bytes(hashlib.sha1(f"pipeline-tune:{study_name}".encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            try:
                connection = engine.connect()
            except Exception as exc:  # noqa: BLE001 - connection refused, bad credentials, missing driver
                raise storage_error(url, exc) from None
            with connection as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".study.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_storage(url: str, heartbeat_s: int, grace_s: int, max_retries: int) -> optuna.storages.RDBStorage:
    """Optuna's SQL storage with heartbeats: a trial whose worker died is failed and (max_retries) retried."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if make_url(url).get_backend_name() == "sqlite" else \
        {"pool_pre_ping": True}
    # Optuna 4.9 renamed RetryFailedTrialCallback; older 4.x only has the old name.
    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = retry_class(max_retry=max_retries) if max_retries > 0 else None
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=grace_s, heartbeat_stale_trial_callback=retry)
    except Exception as exc:  # noqa: BLE001 - connection refused, bad credentials, missing driver
        raise storage_error(url, exc) from None
