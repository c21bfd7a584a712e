"""metrics.jsonl: one JSON object per epoch, the run's source of truth for its history."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.config.secrets import mask_text
from pipeline.errors import first_line


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return mask_text(value)
    return value


class MetricsLog:
    """Appends epoch records; on resume, drops records past the checkpoint so none is duplicated."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, epoch: int) -> None:
        """Keep only records with `epoch` <= the given one (what the resumed checkpoint has seen)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(record) for record in self.read() if record.get("epoch", -1) <= epoch]
        self.path.write_text("".join(line + "\n" for line in kept))

    def reset(self) -> None:
        if self.enabled and self.path.is_file():
            self.path.unlink()

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            handle.flush()

    def read(self) -> list[dict]:
        """The records. A torn last line (a kill during an append) is dropped with a warning; a bad line anywhere
        else is a ValueError naming file and line (the file was edited or damaged: nobody should guess)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if number == len(lines):
                    from pipeline.tracking.console import warn

                    warn(f"{self.path}:{number}: dropping a torn last line (the run was stopped while writing it)")
                    continue
                raise ValueError(f"{self.path}:{number} is not a JSON record ({first_line(exc)}); fix or "
                                 f"remove that line, or start a new run.name") from None
            records.append(record)
        return records
