"""The text tables a run prints: accuracy per method and test set, worst-group accuracy, the
masking figures, timings, and selective classification."""

from __future__ import annotations

from ..evaluation.diagnostics import LOW_HEAT, heat_verdict
from ..evaluation.leakage import MARK_THRESHOLD, verdict


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
    weighted = [f"{method} {t} {per_set[t]['train_weighted_accuracy']:.2f}" for method, per_set in accuracy.items()
                for t in test_sets if per_set[t].get("train_weighted_accuracy") is not None]
    if weighted:
        lines.append("average accuracy weighted by training group sizes: " + ", ".join(weighted))
    for method, figures in results.get("summary", {}).items():
        lines.append(f"{method}: " + ", ".join(f"{name} {value:.2f}" for name, value in figures.items()))
    if "selective" in results:
        lines.append(selective_table(results["selective"]))
    for method, diag in results.get("masking", {}).items():
        figures = ", ".join(f"{k.replace('_percent', '')} {v:.1f}%" if k.endswith("percent") else f"{k} {v:.1f}"
                            for k, v in diag.items())
        lines.append(f"{method} masks: {figures}")
        if diag.get("leakage_percent", 0.0) >= 100 * MARK_THRESHOLD:
            lines.append(f"{method} masks: {verdict(diag['leakage_percent'] / 100)}")
        if diag.get("heat_removed_percent", 100.0) < LOW_HEAT:
            lines.append(f"{method} masks: {heat_verdict(diag['heat_removed_percent'])}")
    if "guarded_mixing" in results:
        lines.append(guarded_verdict(results["guarded_mixing"], results["masking"].get("masktune", {})))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results.get("timings_s", {}).items())
    if timings:
        lines.append(f"time: {timings}")
    return "\n".join(lines)


def guarded_verdict(mixing: str, diag: dict) -> str:
    """What the guarded recipe chose for MaskTune's finetune, and why."""
    own = diag.get("own_leakage_percent", diag.get("leakage_percent"))
    why = f" (leakage {own:.1f}%)" if own is not None else ""
    if mixing == "own":
        return f"guarded recipe: MaskTune's own masks leave no mark{why}, so it finetuned on them alone, as the paper"
    return (f"guarded recipe: MaskTune's own masks leave a mark that predicts the label{why}, so each image was "
            "also masked with the mask of a random image of another class")


def selective_table(selective: dict) -> str:
    """Selective classification: error (%) and realised coverage (%) at each target coverage, and the
    area under the risk-coverage curve, for ERM alone and the MaskTune rule."""
    first = next(iter(selective.values()))
    lines = [f"selective classification on {first['test_set']}: error % (realised coverage %) at target coverage"]
    for method, result in selective.items():
        cells = [f"{target}%: {cell['error']:.2f} ({cell['coverage']:.1f})" if cell["error"] is not None
                 else f"{target}%: - (0.0)" for target, cell in result["error_at_coverage"].items()]
        lines.append(f"  {method:9s} " + "  ".join(cells) + f"  AURC {result['aurc']:.2f}")
    return "\n".join(lines)
