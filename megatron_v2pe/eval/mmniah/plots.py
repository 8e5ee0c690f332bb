"""Plots of an MM-NIAH summary (``summary.report_dict``): a length x depth heatmap per task and the score
per length bin."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def plot_heatmap(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """One length x depth heatmap per task (rows: length bins, columns: depth bins; blank = no sample)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = summary["tasks"]
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    height = rows * (2.4 + 0.4 * len(summary["length_bins"]))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.4 * columns + 1.2, height), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    image = None
    for ax, task in zip(axes.flat, tasks):
        matrix = np.array(
            [[np.nan if v is None else v for v in row] for row in summary["cells"][task]], dtype=float
        )
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{task} ({summary['per_task'][task]:.2f})", fontsize=9)
        ax.set_xticks(range(len(summary["depth_bins"])), summary["depth_bins"], fontsize=7, rotation=45)
        ax.set_yticks(range(len(summary["length_bins"])), summary["length_bins"], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_ylabel("context length (tokens)", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="score")
    figure.suptitle(title or f"MM-NIAH, overall {summary['overall']:.3f}", fontsize=10)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_accuracy_vs_length(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Score per length bin: one line per task and their mean (bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(summary["length_bins"]))
    figure, ax = plt.subplots(figsize=(7, 4.2))
    for task in summary["tasks"]:
        y = np.array([np.nan if v is None else v for v in summary["per_length"][task]], dtype=float)
        ax.plot(x, y, marker="o", linewidth=1, label=task)
    mean = np.array([np.nan if v is None else v for v in summary["mean_per_length"]], dtype=float)
    ax.plot(x, mean, marker="s", linewidth=2.5, color="black", label="mean of tasks")
    ax.set_xticks(x, summary["length_bins"], rotation=30, fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "MM-NIAH score vs context length", fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
