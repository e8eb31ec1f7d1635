"""Human-readable summaries of a run's results."""

from __future__ import annotations


def results_table(results: dict) -> str:
    """Accuracy (%) of each method on each test set, then worst-group accuracy and masking figures."""
    accuracy = results["accuracy"]
    test_sets = list(next(iter(accuracy.values())))
    header = ["method", *test_sets, *(f"{t} worst-group" for t in test_sets)]
    rows = [header]
    for method, per_set in accuracy.items():
        rows.append([method, *(f"{per_set[t]['accuracy']:.2f}" for t in test_sets),
                     *(f"{per_set[t].get('worst_group_accuracy', float('nan')):.2f}" for t in test_sets)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for method, diag in results.get("masking", {}).items():
        figures = ", ".join(f"{k.replace('_percent', '')} {v:.1f}%" if k.endswith("percent") else f"{k} {v:.1f}"
                            for k, v in diag.items())
        lines.append(f"{method} masks: {figures}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results.get("timings_s", {}).items())
    if timings:
        lines.append(f"time: {timings}")
    return "\n".join(lines)
