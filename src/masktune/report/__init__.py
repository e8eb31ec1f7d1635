"""Reporting: the text tables a run prints, and the HTML report of a run with its figures."""

from .report import load_run, write_report
from .tables import results_table, selective_table

__all__ = ["load_run", "results_table", "selective_table", "write_report"]
