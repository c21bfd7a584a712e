"""Bad samples per epoch: summed over ranks into the epoch record, reported, and held to data.max_bad_fraction.

The streams count every sample they inspect (`pipeline.data.samples.faults`); each rank's counts arrive with
its batches. At the end of an epoch one all-gather brings every rank's counts to every rank, so all
ranks see the same totals and take the same stop decision: a threshold breach never leaves one
rank waiting for another. At log steps a smaller check (`check_running`) stops an epoch early once
it is certain to breach: on a large, badly broken dataset that is minutes in, not hours.
"""

from __future__ import annotations

import torch

from pipeline.config.schema import DataConfig
from pipeline.data import SplitLoader
from pipeline.data.samples import faults
from pipeline.distributed import Dist
from pipeline.exits import DataQualityError

SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


class BadDataMonitor:
    """Collects the splits' fault counts, adds them to records, prints a line, and enforces the threshold."""

    def __init__(self, cfg: DataConfig, dist: Dist):
        self.max_bad_fraction, self.root, self.dist = cfg.max_bad_fraction, cfg.root, dist
        self.totals: dict[str, torch.Tensor] = {}

    def collect(self, data: SplitLoader, split: str, epoch: int | None = None) -> dict:
        """The split's counts summed over ranks as record keys (`data/<split>/...`); resets the split's counts."""
        per_rank = self.dist.gather_rows(data.bad_samples.total)
        data.bad_samples.zero()
        total = per_rank.sum(dim=0)
        self.totals[split] = total
        record = faults.counts_record(total, split)
        if self.dist.world_size > 1:
            skipped = [int(r) for r in per_rank[:, 1:1 + len(faults.SKIP_REASONS)].sum(dim=1)]
            record[f"data/{split}/skipped_per_rank"] = skipped
        if faults.num_skipped(total) or any(total[1 + len(faults.SKIP_REASONS):]):
            from rich.markup import escape

            self.dist.print(escape(faults.summary_line(total, SPLIT_NAMES.get(split, split), epoch)))
        return record

    def epoch_record(self, train: SplitLoader, val: SplitLoader, epoch: int) -> dict:
        return {**self.collect(train, "train", epoch), **self.collect(val, "val", epoch)}

    def check(self, epoch: int | None = None) -> None:
        """Raise DataQualityError (on every rank alike) if a collected split exceeds data.max_bad_fraction."""
        for split, total in self.totals.items():
            faults.check_threshold(total, SPLIT_NAMES.get(split, split), self.max_bad_fraction, self.root, epoch)

    def check_running(self, data: SplitLoader, epoch: int, step: int, steps: int) -> None:
        """Mid-epoch (at log steps, on every rank alike): raise DataQualityError once the training samples
        skipped so far exceed data.max_bad_fraction of all the samples the epoch will see. Skips only add
        up, so the epoch would breach at its end anyway: this never stops an epoch that would have passed."""
        if self.max_bad_fraction >= 1:
            return
        planned = torch.tensor([data.stream.samples_per_epoch()], dtype=data.bad_samples.total.dtype)
        total = self.dist.gather_rows(torch.cat([data.bad_samples.total, planned])).sum(dim=0)
        counts, epoch_samples = total[:-1], int(total[-1])
        skipped = faults.num_skipped(counts)
        if skipped > self.max_bad_fraction * epoch_samples:
            raise DataQualityError(
                f"data.max_bad_fraction={self.max_bad_fraction} cannot hold in epoch {epoch}: {skipped} of its "
                f"{epoch_samples} training samples ({100 * skipped / epoch_samples:.2f}%) were already skipped by "
                f"step {step} of {steps} ({faults.describe(counts)}); find them with `pipeline data verify "
                f"{self.root}`, or raise data.max_bad_fraction")
