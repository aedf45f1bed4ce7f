"""The run report: ``report.md`` (config, final metrics, a table per epoch), ``report.png`` (loss, P@k).

Per epoch, validation metrics are named ``valid P@k`` and the test file's ``test P@k``: the test scores of
epochs are curves only (the epoch kept is chosen on validation rows; the final metrics are its test scores).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["epoch_history", "write_report"]


_EPOCH_KINDS = {"epoch": "", "eval_valid": "valid ", "eval_test_curve": "test ", "eval": "test "}
"""Per-epoch log records and the prefix of their metrics in a history row (``eval``: older logs' test)."""


def epoch_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch from ``log.jsonl`` records: the mean training loss, that epoch's validation metrics
    (``valid P@1``, ...) and its test-curve metrics (``test P@1``, ...)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in records:
        prefix = _EPOCH_KINDS.get(record.get("kind", ""))
        if prefix is not None and "epoch" in record:
            row = rows.setdefault(int(record["epoch"]), {"epoch": int(record["epoch"])})
            values = {k: v for k, v in record.items() if k not in ("kind", "time", "step", "epoch")}
            row.update({f"{prefix}{name}": value for name, value in values.items()})
    return [rows[epoch] for epoch in sorted(rows)]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def _plot(path: str, history: list[dict[str, Any]], ks: tuple[int, ...]) -> str | None:
    """Write the loss and P@k curves to ``path``; the reason when it cannot (None when written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'megaclass[report]'): no plot"
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [row.get("train_loss", float("nan")) for row in history], marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Loss")
    for split, style in (("valid", "-"), ("test", "--")):
        for k in ks:
            name = f"{split} P@{k}"
            points = [(row["epoch"], row[name]) for row in history if name in row]
            if points:
                label = f"{name} (curve)" if split == "test" else name
                metric_axes.plot(*zip(*points, strict=False), style, marker="o", label=label)
    metric_axes.set(xlabel="epoch", ylabel="precision", title="P@k (test: curve only)")
    if metric_axes.lines:  # no evaluation ran (eval.every_epochs 0): no legend to draw
        metric_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def _memory_section(memory: dict[str, int] | None) -> list[str]:
    """``## Head memory``: each part of the head's memory in MiB, and the dense head's total beside it."""
    if not memory:
        return []
    rows = [
        {"part": name.removeprefix("head_").removesuffix("_bytes"), "MiB": f"{value / 2**20:.3f}"}
        for name, value in memory.items()
        if name.startswith("head_")
    ]
    dense = memory["dense_head_total_bytes"]
    rows.append({"part": "dense head (weights, gradients, AdamW state)", "MiB": f"{dense / 2**20:.3f}"})
    ratio = memory["head_total_bytes"] / max(dense, 1)
    return [
        "## Head memory",
        _markdown_table(rows, ["part", "MiB"]),
        f"The head holds {100 * ratio:.1f}% of what the dense head would need.",
    ]


def write_report(
    out_dir: str,
    *,
    config_yaml: str,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    ks: tuple[int, ...],
    head_memory: dict[str, int] | None = None,
) -> str:
    """Write ``out_dir/report.md`` and ``out_dir/report.png``; returns the report's path.

    ``head_memory``: the ``head_*_bytes`` and ``dense_head_total_bytes`` of
    :func:`megaclass.train.memory.head_memory`, shown as a table of MiB beside the dense head's need.
    """
    note = _plot(os.path.join(out_dir, "report.png"), history, ks)
    final = [{"metric": name, "value": value} for name, value in metrics.items()]
    names = [name.removeprefix("valid_") for name in metrics]  # a run without a test file: valid_ ones
    ranking = list(dict.fromkeys(name for name in names if name.startswith(("P@", "nDCG@", "PSP@"))))
    columns = ["epoch", "train_loss"] + [f"{split} {name}" for split in ("valid", "test") for name in ranking]
    columns = [column for column in columns if any(column in row for row in history)]
    sections = [
        "# Run report",
        "## Final metrics",
        _markdown_table(final, ["metric", "value"]),
        *_memory_section(head_memory),
        "## Per epoch (validation rows pick the epoch kept; test scores per epoch are curves only)",
        _markdown_table(history, columns) if history else "No epoch finished.",
        "![loss and P@k per epoch](report.png)" if note is None else f"_{note}_",
        "## Config",
        f"```yaml\n{config_yaml.rstrip()}\n```",
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n\n".join(sections) + "\n")
    return path
