"""The pipeline: run configuration, the experiment registry (with the paper's experiments
registered here, explicitly), the run directory, the stages of a run, the runner and sweeps."""

from .config import METHODS, RunConfig, parse_overrides
from .experiments import PAPER_EXPERIMENTS
from .registry import EXPERIMENTS, Experiment, ExperimentData, get_experiment, make_config, register
from .runner import check_config, run_experiment

for _experiment in PAPER_EXPERIMENTS:
    register(_experiment)

__all__ = ["EXPERIMENTS", "METHODS", "PAPER_EXPERIMENTS", "Experiment", "ExperimentData", "RunConfig", "check_config",
           "get_experiment", "make_config", "parse_overrides", "register", "run_experiment"]
