"""Reporting: the text tables a run prints, and the HTML report of a run with its figures."""

from .figures import saliency_grid
from .report import load_run, training_groups, write_report
from .tables import results_table, selective_table

__all__ = ["load_run", "results_table", "saliency_grid", "selective_table", "training_groups", "write_report"]
