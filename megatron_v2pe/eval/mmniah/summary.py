"""The JSON-ready summary of an MM-NIAH evaluation: the aggregated tables with their bin labels, and
every sample's result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from megatron_v2pe.eval.answer_normaliser import Mode
from megatron_v2pe.eval.mmniah.aggregation import DEPTH_BINS, Binning, Scored, aggregate
from megatron_v2pe.eval.mmniah.run import SampleResult


def depth_labels() -> list[str]:
    return [f"{k / DEPTH_BINS:.1f}-{(k + 1) / DEPTH_BINS:.1f}" for k in range(DEPTH_BINS)]


def length_labels(edges: Sequence[int]) -> list[str]:
    return [f"{lo}-{edges[i + 1]}" if i + 1 < len(edges) else f">={lo}" for i, lo in enumerate(edges)]


def report_dict(
    results: Sequence[SampleResult],
    length_edges: Sequence[int],
    binning: Binning = "official",
    mode: Mode = "official",
) -> dict[str, Any]:
    """Dense [length bin][depth bin] matrices per task (None where empty), scores per length bin, per
    task, per needle kind and overall, sample counts, and every sample's result."""
    edges = sorted(int(e) for e in length_edges)
    scored = [Scored(r.task, r.context_length, r.depths, r.score) for r in results]
    report = aggregate(scored, edges, binning, mode)
    return {
        "scoring": mode,
        "binning": binning,
        "length_edges": edges,
        "length_bins": length_labels(edges),
        "depth_bins": depth_labels(),
        "tasks": report.tasks,
        "overall": report.overall,
        "by_needle": report.by_needle,
        "per_task": report.per_task,
        "per_length": report.per_length,
        "mean_per_length": report.mean_per_length,
        "cells": report.cells,
        "counts": report.counts,
        "dropped_below_first_bin": report.dropped,
        "samples": [asdict(r) for r in results],
    }
