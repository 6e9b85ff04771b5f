"""Many concepts at once: separate runs in parallel, a merged model, a joint run, one summary.

`spec` reads and checks the batch file; `run` runs each concept through `job.run_concept` as a
Ray task, the joint run and the evaluation of every variant; `merge` makes one model of the
concepts' deltas; `report` writes summary.json / summary.md. See docs/design.md.
"""
from __future__ import annotations

from .merge import merge_batch, merge_captions, names_any, training_captions
from .report import acceptance, console_table, summarize_metrics, summary_markdown, write_summary
from .run import batch_models, concept_done, evaluate_variant, run_batch, run_joint, run_separate
from .spec import STATUS_NAME, VARIANTS, Batch, BatchConcept, BatchSettings, batch_from_dict, joint_config, load_batch

__all__ = ["STATUS_NAME", "VARIANTS", "Batch", "BatchConcept", "BatchSettings", "acceptance", "batch_from_dict",
           "batch_models", "concept_done", "console_table", "evaluate_variant", "joint_config", "load_batch",
           "merge_batch", "merge_captions", "names_any", "run_batch", "run_joint", "run_separate",
           "summarize_metrics", "summary_markdown", "training_captions", "write_summary"]
