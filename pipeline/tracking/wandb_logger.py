"""Weights & Biases, or a do-nothing stand-in, behind one small interface.

Logging never stops or stalls training:

- online mode is decided *before* `wandb.init`: without credentials, or when the server does not
  answer an HTTP request within `logging.wandb_init_timeout`, the run logs offline (one warning);
- `wandb.init` itself runs under the same timeout; if it fails or times out online, the run starts
  again offline, and if that fails too, it goes on without W&B (metrics.jsonl has everything);
- a call that raises later (`log`, `summary`, `finish`) disables the tracker with one warning;
  `finish` gives up uploading after `logging.wandb_finish_timeout` (the data stays for `wandb sync`).

The config, the command line W&B records, and every warning have their secrets masked.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import netrc
import os
import secrets
import socket
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

from pipeline.config.schema import LoggingConfig
from pipeline.config.secrets import mask, mask_url, mask_value
from pipeline.errors import first_line
from pipeline.run_folder import RunFolder
from pipeline.tracking.console import warn

DEFAULT_BASE_URL = "https://api.wandb.ai"
MAX_PROBE_SECONDS = 10.0


class NullTracker:
    """Used when W&B is disabled and on non-main ranks: every call does nothing."""

    run_id: str | None = None

    def log(self, values: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_images(self, images: dict[str, bytes]) -> None:
        pass

    def finish(self) -> None:
        pass


def _never_raises(method: Callable) -> Callable:
    """A failing W&B call warns once and turns the tracker off; training goes on."""

    @functools.wraps(method)
    def wrapper(self: "WandbTracker", *args, **kwargs):
        if self.run is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            warn(f"W&B {method.__name__} failed ({first_line(exc, typed=True)}); W&B logging is off for the rest of "
                 f"this run (metrics.jsonl has everything)")
            self.run = None
            return None

    return wrapper


@contextlib.contextmanager
def _masked_argv() -> Iterator[None]:
    """W&B records sys.argv in the run's metadata: hand it a copy with secrets masked."""
    original = sys.argv
    sys.argv = [mask_value(arg) for arg in original]
    try:
        yield
    finally:
        sys.argv = original


class WandbTracker:
    """A W&B run whose id is kept in the run folder, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, name: str, config: dict,
                 base_url: str | None = None, init_timeout: float = 60.0, finish_timeout: float = 600.0):
        import wandb

        id_file = RunFolder(run_dir).wandb_id
        # W&B run ids are lowercase alphanumerics; wandb.util.generate_id is gone from recent releases.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        settings = {"console": "off", "init_timeout": init_timeout, "finish_timeout": finish_timeout}
        if base_url and mode == "online":
            settings["base_url"] = base_url
        self.run = None
        with _masked_argv():
            self.run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", mode=mode,
                                  dir=str(run_dir), config=mask(config), settings=wandb.Settings(**settings))
        self.run_id = run_id
        self.mode = mode

    @_never_raises
    def log(self, values: dict, step: int) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    @_never_raises
    def summary(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.run.summary[key] = value

    @_never_raises
    def log_images(self, images: dict[str, bytes]) -> None:
        """PNG images (e.g. the report's figures) as wandb.Image, at the run's current step."""
        import io

        import wandb
        from PIL import Image

        self.run.log({k: wandb.Image(Image.open(io.BytesIO(v))) for k, v in images.items()})

    @_never_raises
    def finish(self) -> None:
        run, self.run = self.run, None
        run.finish()


def server_url(base_url: str | None) -> str:
    """The W&B server online mode talks to: the config, else $WANDB_BASE_URL, else W&B's cloud."""
    return base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def missing_credentials(url: str) -> Optional[str]:
    """Why online mode cannot log in without asking (a prompt would block the run), or None."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(url).hostname or ""
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    return f"no W&B credentials for {host} (set WANDB_API_KEY or run `wandb login`)"


def probe(url: str, timeout: float) -> Optional[str]:
    """None if the server answers HTTP within `timeout` seconds (any status counts), else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # it answered (401, 404...): reachable
        return None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # it answered TLS; let wandb judge the certificate
            return None
        return first_line(exc.reason, typed=True) if isinstance(exc.reason, BaseException) else str(exc.reason)
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout:g}s"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return first_line(exc, typed=True)


def _reset_wandb() -> None:
    """Shut down W&B's service after a failed start: it still holds the run id, which the offline retry reuses."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001 - best effort
        pass


def build_tracker(run_dir: Path, logging: LoggingConfig, name: str, config: dict,
                  is_main: bool) -> NullTracker | WandbTracker:
    """The run's tracker, as `logging` (the config's logging section) sets it; falls back online -> offline ->
    none, with one warning each, and never raises. `config` is the run's resolved config, stored with it."""
    mode, project, entity, base_url = logging.wandb_mode, logging.wandb_project, logging.wandb_entity, \
        logging.wandb_base_url
    init_timeout, finish_timeout = logging.wandb_init_timeout, logging.wandb_finish_timeout
    if not is_main or mode == "disabled":
        return NullTracker()
    offline_note = f"logging offline to {RunFolder(run_dir).wandb} (upload later with `wandb sync`)"
    if mode == "online":
        url = server_url(base_url)
        problem = missing_credentials(url) or probe(url, min(init_timeout, MAX_PROBE_SECONDS))
        if problem:
            warn(f"W&B server {mask_url(url)} unusable ({problem}); {offline_note}")
            mode = "offline"
    attempts = ["online", "offline"] if mode == "online" else [mode]
    for attempt in attempts:
        try:
            return WandbTracker(run_dir, attempt, project, entity, name, config, base_url, init_timeout,
                                finish_timeout)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            after = offline_note if attempt == "online" else "continuing without W&B (metrics.jsonl has everything)"
            warn(f"W&B could not start in {attempt} mode ({first_line(exc, typed=True)}); {after}")
            _reset_wandb()
    return NullTracker()
