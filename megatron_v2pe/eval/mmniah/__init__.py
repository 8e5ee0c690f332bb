"""The MM-NIAH harness: records -> prompts -> responses -> scores -> length x depth report.

``records`` reads the released jsonl and our synthetic shards, ``prompts`` builds MM-NIAH's user text
and its tokens, ``run`` generates and scores (rules in ``eval/scoring.py``), ``aggregation`` bins and
averages, ``summary`` writes the JSON report and ``plots`` draws it. The names below are the entry
points ``tools/evaluate.py`` and the demo use.
"""

from megatron_v2pe.eval.mmniah.aggregation import BINNINGS, OFFICIAL_LENGTH_EDGES, default_length_edges
from megatron_v2pe.eval.mmniah.plots import plot_accuracy_vs_length, plot_heatmap
from megatron_v2pe.eval.mmniah.prompts import (
    PROTOCOLS,
    build_prompt,
    official_prompt,
    prompt_builder,
    tile_budget,
)
from megatron_v2pe.eval.mmniah.records import NiahRecord, ShardReadStats, read_records, task_name
from megatron_v2pe.eval.mmniah.run import SampleResult, check_lengths, evaluate_records
from megatron_v2pe.eval.mmniah.summary import report_dict

__all__ = [
    "BINNINGS",
    "OFFICIAL_LENGTH_EDGES",
    "PROTOCOLS",
    "NiahRecord",
    "SampleResult",
    "ShardReadStats",
    "build_prompt",
    "check_lengths",
    "default_length_edges",
    "evaluate_records",
    "official_prompt",
    "plot_accuracy_vs_length",
    "plot_heatmap",
    "prompt_builder",
    "read_records",
    "report_dict",
    "task_name",
    "tile_budget",
]
