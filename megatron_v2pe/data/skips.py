"""Bad input is skipped, never fatal: every skip is counted by reason and logged with the sample's key.

A sample with a problem is dropped whole, so its tokens and images can never end up paired with another
sample's. Problems below the sample level (a shard that cannot be opened, unreadable bytes inside a tar,
a sample shortened to fit a pack) are counted as events next to the skips.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

logger = logging.getLogger("megatron_v2pe.data")


class SkipReason(StrEnum):
    """Why a sample was dropped."""

    INVALID_JSON = "invalid_json"  # the .json member is not valid JSON (or not UTF-8)
    MISSING_RECORD = "missing_record"  # a key with images but no .json member
    BAD_RECORD = "bad_record"  # valid JSON that is not a conversation record
    MISSING_IMAGE = "missing_image"  # the record names an image member that is absent
    BAD_IMAGE = "bad_image"  # an image member that does not decode
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"  # <image> placeholders != images
    CORRUPT_MEMBER = "corrupt_member"  # incomplete because tar data next to it was unreadable
    DUPLICATE_KEY = "duplicate_key"  # next to another sample with the same key (both are dropped)
    NO_TARGETS = "no_targets"  # nothing to learn: no assistant token is supervised
    TOO_LONG = "too_long"  # longer than a pack (dropped, or nothing supervised left after truncation)
    TOO_MANY_TILES = "too_many_tiles"  # more tiles than a pack holds (same)


class DataEvent(StrEnum):
    """Counted problems that are not a dropped sample."""

    TRUNCATED = "truncated"  # a sample cut at a text boundary to fit a pack
    UNREADABLE_SHARD = "unreadable_shard"  # a shard that could not be opened or read at all
    CORRUPT_TAR_DATA = "corrupt_tar_data"  # unreadable bytes inside a shard, skipped to the next member


class BadSample(Exception):
    """Raised while building a sample; the pipeline catches it, counts the reason and moves on."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SkipStats:
    """Counters of skips and events; plain-data state so it travels in checkpoints and across workers."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

    def skip(self, reason: SkipReason, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        logger.warning("skipped sample %s: %s (%s)", key, reason, detail)

    def event(self, event: DataEvent, where: str, detail: str) -> None:
        self.events[event] += 1
        logger.warning("%s at %s: %s", event, where, detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        def counts(counter: Counter[str]) -> str:
            return ", ".join(f"{name} {n}" for name, n in sorted(counter.items())) or "none"

        return (
            f"skipped samples: {self.total_skipped} ({counts(self.skipped)}); events: {counts(self.events)}"
        )

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {"skipped": dict(self.skipped), "events": dict(self.events)}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        self.skipped = Counter(state["skipped"])
        self.events = Counter(state["events"])

    @classmethod
    def merged(cls, states: Iterable[dict[str, dict[str, int]]]) -> SkipStats:
        """The sum of several streams' counters (one per worker and rank)."""
        total = cls()
        for state in states:
            total.skipped.update(state["skipped"])
            total.events.update(state["events"])
        return total
