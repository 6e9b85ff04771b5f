"""Ray Tune over whole single-concept ablation runs: the space (`space.py`), the objective
(`objective.py`), the search (`search.py`) and what it writes (`report.py`)."""
from __future__ import annotations

from .objective import objective_parts
from .report import console_table, plot_objective, report_markdown, write_trials_csv
from .search import TuneSettings, run_trial, tune_ablation
from .space import DISTRIBUTIONS, SEARCHABLE, Param, apply_params, default_space, load_space, parse_flag, parse_param

__all__ = ["DISTRIBUTIONS", "SEARCHABLE", "Param", "TuneSettings", "apply_params", "console_table", "default_space",
           "load_space", "objective_parts", "parse_flag", "parse_param", "plot_objective", "report_markdown",
           "run_trial", "tune_ablation", "write_trials_csv"]
