"""`pipeline data verify SHARDS_DIR | SPEC...`: check every shard against its manifest or index; decode every sample.

SHARDS_DIR is one of our folders (manifest.json); any other spec (WebDataset shards in a folder,
files, patterns, URLs; see `pipeline.data.dataset.specs`) is checked against its index (built if needed).
Shards are read with the training stream's reader (`pipeline.data.io.tar`), so the two never disagree.
Per shard: the file exists, its size (and sha256, where the manifest has it) match, it holds the number of samples
the manifest says, and every sample passes the same inspection the training stream applies
(`pipeline.data.samples.faults.inspect_sample`: label present and in range, image decodes). Images whose
mode or size differ from the dataset's are reported as "converted on load" (not a problem: the
loader fixes them). Exit code 0 when nothing is wrong, 1 when something is.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.schema import DataConfig
from pipeline.data.dataset.manifest import MANIFEST_NAME, Manifest, ShardInfo
from pipeline.data.dataset.resolve import read_options, sample_keys, specs_manifest
from pipeline.data.dataset.specs import SHARD_SUFFIXES, describe, is_shard_name, is_url
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.stat import stat_shard
from pipeline.data.io.tar import tar_samples
from pipeline.data.samples.faults import MISSING, inspect_sample
from pipeline.data.stream import shard_paths, shard_slice
from pipeline.errors import short_error

EXAMPLES_PER_SHARD = 3


@dataclass
class ShardReport:
    """What verification found in one shard."""

    split: str
    name: str
    expected: int
    found: int = 0
    file_problem: str = ""
    """Missing file, size or sha256 mismatch, a read error: empty when the file itself is fine."""
    skipped: Counter = field(default_factory=Counter)
    """Bad samples by reason (truncated, undecodable, no_label, bad_label)."""
    converted: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    """The first few bad samples: 'key (reason: detail)'."""

    @property
    def ok(self) -> bool:
        return not self.file_problem and not self.skipped and self.found == self.expected

    def problems(self) -> str:
        parts = [self.file_problem] if self.file_problem else []
        if self.found > self.expected:
            parts.append(f"{self.found} samples where the manifest says {self.expected}")
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            parts.append(f"{sum(self.skipped.values())} bad sample(s): {reasons}; first: {'; '.join(self.examples)}")
        return "; ".join(parts)


@dataclass
class VerifyReport:
    root: Path
    shards: list[ShardReport]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    def totals(self) -> tuple[int, int, Counter, Counter]:
        """(samples expected, samples read, bad by reason, converted by kind) over all shards."""
        skipped, converted = Counter(), Counter()
        for shard in self.shards:
            skipped.update(shard.skipped)
            converted.update(shard.converted)
        return sum(s.expected for s in self.shards), sum(s.found for s in self.shards), skipped, converted


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _file_problem(url: str, info: ShardInfo, options: ReadOptions | None) -> str:
    if not is_url(url) and not Path(url).is_file():
        return "file missing"
    try:
        size, _ = stat_shard(url, options)
    except Exception as exc:  # noqa: BLE001 - a remote shard that cannot be looked at
        return f"cannot be read ({short_error(exc)})"
    if info.num_bytes and size is not None and size != info.num_bytes:
        return f"size {size} bytes, manifest says {info.num_bytes}; sha256 differs"
    if info.sha256 and not is_url(url) and _sha256(Path(url)) != info.sha256:
        return "sha256 differs from the manifest's"
    return ""


def _samples(url: str, expected: int, options: ReadOptions | None):
    """The samples the manifest promises, as the loader reads them (`shard_slice`: stand-ins for those the shard
    lacks), then any the shard has beyond them (reported as too many)."""
    yield from shard_slice(url, 0, expected, options)
    extra = tar_samples(url, expected, options=options)
    try:
        yield from extra
    except Exception:  # noqa: BLE001 - a shard that ends early was reported by shard_slice already
        pass
    finally:
        extra.close()


def verify_shard(root: Path, split: str, info: ShardInfo, manifest: Manifest, advance=lambda n: None,
                 data: DataConfig | None = None) -> ShardReport:
    data = data or DataConfig()
    url, options = shard_paths(root, [info.name])[0], read_options(data)
    report = ShardReport(split, info.name, info.num_samples, file_problem=_file_problem(url, info, options))
    if report.file_problem == "file missing" or report.file_problem.startswith("cannot be read"):
        advance(info.num_samples)
        return report
    keys = sample_keys(data, manifest.classes)
    for sample in _samples(url, info.num_samples, options):
        check = inspect_sample(sample, "RGB", manifest.num_classes, manifest.image_mode or None, manifest.image_size,
                               keys=keys)
        if MISSING not in sample:
            report.found += 1
        report.converted.update(check.converted)
        if check.reason:
            report.skipped[check.reason] += 1
            if len(report.examples) < EXAMPLES_PER_SHARD and check.reason != "truncated":
                report.examples.append(f"{check.key} ({check.reason}: {check.detail})")
            elif check.reason == "truncated" and not any(e.startswith("shard ends") for e in report.examples):
                report.examples.append(f"shard ends after {report.found} samples ({check.detail})")
        advance(1)
    return report


def verify_shards(root: str | Path | list[str], show_progress: bool = True,
                  data: DataConfig | None = None) -> VerifyReport:
    """Verify every shard of every split of our folder `root`, or of the shard specs `root` names (checked against
    their index; `data` gives the label/image keys, classes and index folder). Raises FileNotFoundError/ValueError
    (one line) for a bad folder, manifest or spec."""
    from pipeline.tracking.console import progress_bar

    specs = [str(r) for r in root] if isinstance(root, list) else [str(root)]
    data = data or DataConfig()
    if len(specs) == 1 and (Path(specs[0]) / MANIFEST_NAME).is_file():
        where, manifest = Path(specs[0]), Manifest.read(specs[0])
    elif len(specs) == 1 and not is_url(specs[0]) and not Path(specs[0]).exists() and "{" not in specs[0] \
            and not any(c in specs[0] for c in "*?["):
        raise FileNotFoundError(f"shard folder '{specs[0]}' does not exist")
    elif (len(specs) == 1 and Path(specs[0]).is_dir()
          and not any(is_shard_name(p.name) for p in Path(specs[0]).iterdir())):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in '{specs[0]}' and no shard files ({', '.join(SHARD_SUFFIXES)}) "
                                f"either; build shards with `pipeline data shards SRC {specs[0]}`")
    else:
        where, manifest = Path("."), specs_manifest({"shards": specs}, data, progress=show_progress, key_prefix="")
    shards = [(split, info) for split, s in manifest.splits.items() for info in s.shards]
    reports = []
    with progress_bar(enabled=show_progress) as progress:
        task = progress.add_task("verifying", total=sum(info.num_samples for _, info in shards))
        for split, info in shards:
            reports.append(verify_shard(where, split, info, manifest, lambda n: progress.advance(task, n), data))
    return VerifyReport(Path(describe(specs)) if where == Path(".") else where, reports)


def _file_status(problem: str) -> str:
    """A short word for the table (the 'problem:' line has the whole story)."""
    if not problem:
        return "ok"
    return {"file missing": "missing", "sha256 differs from the manifest's": "sha256 differs"}.get(
        problem, "size, sha256 differ")


def print_report(report: VerifyReport) -> None:
    """A rich table (one row per shard), one 'problem:' line per bad shard, and a verdict line."""
    from rich.markup import escape
    from rich.table import Table

    from pipeline.tracking.console import console

    table = Table(title=escape(f"shards in {report.root}"), title_justify="left")
    for name, kwargs in (("split", {}), ("shard", {"no_wrap": True}), ("samples", {"justify": "right"}),
                         ("file", {}), ("bad", {"justify": "right"}), ("converted", {})):
        table.add_column(name, **kwargs)
    for shard in report.shards:
        samples = f"{shard.found}/{shard.expected}" if shard.found != shard.expected else str(shard.found)
        bad = sum(shard.skipped.values())
        converted = ", ".join(f"{kind} {n}" for kind, n in sorted(shard.converted.items()))
        style = "" if shard.ok else "red"
        table.add_row(shard.split, shard.name, samples, _file_status(shard.file_problem),
                      str(bad) if bad else "", converted, style=style)
    console.print(table)
    for shard in report.shards:
        if not shard.ok:
            console.print(escape(f"problem: {shard.split} shard {shard.name}: {shard.problems()}"))
    expected, found, skipped, converted = report.totals()
    bad_shards = sum(not s.ok for s in report.shards)
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
    conversions = ", ".join(f"{kind} {n}" for kind, n in sorted(converted.items())) or "none"
    verdict = "OK" if report.ok else "PROBLEMS"
    console.print(escape(f"{verdict}: {len(report.shards)} shard(s), {found} of {expected} samples read, "
                         f"{sum(skipped.values())} bad ({reasons}) in {bad_shards} shard(s); "
                         f"converted on load: {conversions}"))
