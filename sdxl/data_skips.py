"""Skipped samples of the SDXL data layer: one record per skip, counts by reason, the skip-share limit.

A bad sample (an image that does not decode, a truncated shard, a caption that is not UTF-8, a
malformed index line, ...) is never turned into data and never stops a run on its own: it becomes a
``Skip(reason, name, detail)`` (``name`` = file, ``file:line`` or ``shard.tar:key``), is logged once as
one warning line, and is counted by reason (``REASONS``). A run stops only when the share of skips

    fraction = skipped / seen,    seen = delivered + skipped

exceeds ``max_fraction`` (``SkipStats.check``, ``TooManySkipsError`` with the counts by reason).
When the number of rows of a dataset is known up front (``total``), the check uses
``skipped / max(seen, total)``: it fires as soon as the limit can no longer be met over a full pass and
never earlier. When it is not known (a webdataset stream), the check waits for ``min_seen`` samples
(or ``final=True``).

Across DataLoader workers: each sample carries the ``Skip`` records of the samples it stepped over
(``sample["skipped"]``), ``collate`` concatenates them into ``batch["skipped"]``, and the main process
counts them with ``SkipStats.add_batch(batch)``. Across processes: ``batch_skip_vector(batch)`` is a
small integer tensor ``[delivered, count per reason...]`` to all-reduce (sum) before
``SkipStats.add_vector``, so every rank sees the same totals and stops at the same step.
"""
from __future__ import annotations

import logging
from typing import Iterable, NamedTuple

import torch

from odecm.cli import InputError

log = logging.getLogger("sdxl.data")

#: reason -> what it means (the keys are the names used in metrics.json and log.jsonl)
REASONS: dict[str, str] = {
    "unreadable_image": "the image does not decode (truncated, not an image, empty, unsupported pixel format)",
    "missing_image": "an index row names a file that does not exist, or a shard sample has no image member",
    "truncated_shard": "a tar shard ends inside a sample (or without its end-of-archive blocks)",
    "unreadable_shard": "a tar shard cannot be opened as a tar archive",
    "bad_caption_encoding": "a caption (sidecar .txt, shard .txt, index line) is not valid UTF-8",
    "malformed_index_line": "an index line that is not a JSON object / a CSV row with the wrong number of "
                            "fields / a row without an image path / a caption that is not a string",
    "malformed_caption_json": "a shard's .json member does not parse, or its caption is not a string",
}

#: samples a stream must have seen before ``check`` may stop it (when the total is unknown)
MIN_SEEN = 1000
#: distinct names kept per reason for reports
EXAMPLES_PER_REASON = 5


class Skip(NamedTuple):
    """One skipped sample: ``reason`` (a key of ``REASONS``), ``name`` (file, ``file:line`` or
    ``shard.tar:key``) and a one-line ``detail``."""

    reason: str
    name: str
    detail: str = ""

    def line(self) -> str:
        detail = " ".join(self.detail.split())
        return f"skipped {self.name} ({self.reason}{': ' + detail if detail else ''})"


def skip(reason: str, name: str, detail: str | BaseException = "", warn: bool = True) -> Skip:
    """Make a ``Skip`` (``detail`` may be an exception) and log it as one warning line."""
    if reason not in REASONS:
        raise ValueError(f"skip reason {reason!r}; allowed values: {list(REASONS)}")
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {detail}"
    record = Skip(reason, str(name), " ".join(str(detail).split()))
    if warn:
        log.warning("%s", record.line())
    return record


class TooManySkipsError(InputError):
    """The share of skipped samples exceeded the configured limit; the message gives the counts by reason."""


def batch_skip_vector(batch: dict) -> torch.Tensor:
    """``[delivered, count of each reason in REASONS order]`` (int64) of one collated batch."""
    counts = [len(batch["caption"])] + [0] * len(REASONS)
    order = {reason: i + 1 for i, reason in enumerate(REASONS)}
    for record in batch.get("skipped", []):
        counts[order[record.reason]] += 1
    return torch.tensor(counts, dtype=torch.long)


class SkipStats:
    """Counts of delivered and skipped samples, by reason, with the skip-share limit.

    ``max_fraction`` (None = no limit), ``total`` (rows known up front, or None), ``key`` (the config
    key named in the error), ``min_seen`` (see the module docstring). Single process:
    ``add_batch(batch)`` per batch; several processes: ``add_vector(all_reduce(batch_skip_vector(b)))``.
    """

    def __init__(self, max_fraction: float | None = None, total: int | None = None,
                 key: str = "max_skip_fraction", min_seen: int = MIN_SEEN):
        if max_fraction is not None and not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"{key}={max_fraction}; allowed: a number in [0, 1]")
        self.max_fraction, self.total, self.key, self.min_seen = max_fraction, total, key, min_seen
        self.delivered = 0
        self.by_reason: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.examples: dict[str, list[str]] = {reason: [] for reason in REASONS}
        self.files: list[str] = []  # distinct skipped names, first 1000

    @classmethod
    def for_dataset(cls, dataset, max_fraction: float | None = None,
                    key: str = "max_skip_fraction") -> "SkipStats":
        """Stats for a run over ``dataset``: its row count as ``total`` (map-style datasets) and the rows
        its listing already skipped (malformed index lines, ...), then ``check()`` (a listing that is
        mostly bad stops here, before any model loads)."""
        listing_skips = list(getattr(dataset, "listing_skips", []))
        total = getattr(dataset, "num_rows", None)
        stats = cls(max_fraction, total, key)
        stats.extend(listing_skips)
        stats.check()
        return stats

    # ------------------------------------------------------------------------------------ counting
    @property
    def count(self) -> int:
        """Skipped samples (events: a bad file met twice counts twice)."""
        return sum(self.by_reason.values())

    skipped = count

    @property
    def seen(self) -> int:
        return self.delivered + self.count

    @property
    def fraction(self) -> float:
        return self.count / self.seen if self.seen else 0.0

    def add(self, record: Skip) -> None:
        self.by_reason[record.reason] += 1
        examples = self.examples[record.reason]
        if record.name not in examples and len(examples) < EXAMPLES_PER_REASON:
            examples.append(record.name)
        if len(self.files) < 1000 and record.name not in self.files:
            self.files.append(record.name)

    def extend(self, records: Iterable[Skip]) -> None:
        for record in records:
            self.add(record)

    def add_batch(self, batch: dict) -> dict[str, int]:
        """Count a collated batch (delivered samples and ``batch["skipped"]``); returns the batch's skip
        counts by reason (nonzero ones only)."""
        self.delivered += len(batch["caption"])
        step: dict[str, int] = {}
        for record in batch.get("skipped", []):
            self.add(record)
            step[record.reason] = step.get(record.reason, 0) + 1
        return step

    def vector(self) -> torch.Tensor:
        """``[delivered, count per reason]`` (the layout of ``batch_skip_vector``)."""
        return torch.tensor([self.delivered, *self.by_reason.values()], dtype=torch.long)

    def add_vector(self, vector: torch.Tensor | Iterable[int]) -> dict[str, int]:
        """Add a ``batch_skip_vector`` (typically summed over processes); returns its nonzero counts."""
        values = [int(v) for v in (vector.tolist() if isinstance(vector, torch.Tensor) else vector)]
        if len(values) != 1 + len(REASONS):
            raise ValueError(f"skip vector of length {len(values)}; expected {1 + len(REASONS)}")
        self.delivered += values[0]
        step = {}
        for reason, n in zip(REASONS, values[1:]):
            self.by_reason[reason] += n
            if n:
                step[reason] = n
        return step

    def add_examples(self, examples: dict[str, list[str]]) -> None:
        """Keep up to ``EXAMPLES_PER_REASON`` distinct names per reason."""
        for reason, names in examples.items():
            kept = self.examples[reason]
            kept += [n for n in dict.fromkeys(names) if n not in kept][:max(EXAMPLES_PER_REASON - len(kept), 0)]

    def merge(self, other: "SkipStats") -> None:
        """Add another process's or unit's counts and examples."""
        self.add_vector(other.vector())
        self.add_examples(other.examples)

    # ------------------------------------------------------------------------------------ reporting
    def by_reason_text(self) -> str:
        """``unreadable_image 5, truncated_shard 2`` (nonzero reasons) or ``none``."""
        return ", ".join(f"{reason} {n}" for reason, n in self.by_reason.items() if n) or "none"

    def describe(self) -> str:
        """One line: ``7 of 120 samples skipped (5.8%): unreadable_image 5, truncated_shard 2``."""
        return f"{self.count} of {self.seen} samples skipped ({100 * self.fraction:.1f}%): {self.by_reason_text()}"

    def summary(self) -> dict:
        """JSON-ready totals for ``metrics.json``."""
        return dict(seen=self.seen, delivered=self.delivered, skipped=self.count, skip_fraction=self.fraction,
                    skipped_by_reason=dict(self.by_reason), max_skip_fraction=self.max_fraction,
                    skip_examples={r: list(v) for r, v in self.examples.items() if v})

    def step_fields(self, step: dict[str, int] | torch.Tensor | None = None) -> dict[str, float | int]:
        """Flat scalars for one ``log.jsonl`` line: ``skipped`` (this step; ``step`` = the dict that
        ``add_batch``/``add_vector`` returned, or a skip vector), ``skipped_total``, ``skip_fraction``
        and ``skipped_<reason>`` for this step's nonzero reasons."""
        if isinstance(step, torch.Tensor):
            step = {r: int(n) for r, n in zip(REASONS, step.tolist()[1:]) if n}
        step = step or {}
        fields: dict[str, float | int] = dict(skipped=sum(step.values()), skipped_total=self.count,
                                              skip_fraction=self.fraction)
        fields.update({f"skipped_{reason}": n for reason, n in step.items()})
        return fields

    def check(self, final: bool = False) -> None:
        """Raise ``TooManySkipsError`` if ``skipped > max_fraction * max(seen, total)`` (see the module
        docstring for when a check without a known total may fire)."""
        if self.max_fraction is None or self.count == 0:
            return
        if self.total is None and not final and self.seen < self.min_seen:
            return
        denominator = max(self.seen, self.total or 0)
        if self.count > self.max_fraction * denominator:
            examples = "; ".join(f"{r}: {', '.join(v[:2])}" for r, v in self.examples.items() if v)
            unit = "rows" if denominator == self.total else "samples"
            raise TooManySkipsError(
                f"{self.key}={self.max_fraction}: {self.count} of {denominator} {unit} skipped "
                f"({100 * self.count / denominator:.1f}%), more than allowed; by reason: {self.by_reason_text()}"
                + (f"; e.g. {examples}" if examples else ""))
