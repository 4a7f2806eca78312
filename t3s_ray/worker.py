"""What one training rank does: the names of ``t3s_ray.training`` at their old import path.

The worker was one module; it is now the ``training/`` package, cut along its seams (see
``docs/architecture.md``): ``spec`` (what the driver hands a rank), ``trainer`` (``StudentTrainer``,
``train_standalone``), ``module`` (the model, its scoring pass and export), ``steps`` (step
arithmetic, the mask prefetcher), ``online`` (the bottleneck switch), ``metrics`` and ``sessions``.
``t3s_ray.worker.train_standalone`` and the other names below keep working from here.
"""

from __future__ import annotations

from .runfolder import run_settings
from .training.metrics import MetricsLog, step_metrics
from .training.module import LogprobModule, export_hf_model, fsdp_units, score_examples
from .training.online import bottleneck_passed, sample_accuracy
from .training.sessions import LocalSession, RaySession, Session, write_checkpoint_folder
from .training.spec import SelectionPlan, TrainJob, WorkerSpec, selection_rule, worker_spec
from .training.steps import MaskPrefetcher, learning_rate, loss_denominator, padding_free
from .training.trainer import CHECKPOINT_STATE, StudentTrainer, TrainerState, train_standalone

__all__ = ["CHECKPOINT_STATE", "LocalSession", "LogprobModule", "MaskPrefetcher", "MetricsLog", "RaySession",
           "SelectionPlan", "Session", "StudentTrainer", "TrainJob", "TrainerState", "WorkerSpec", "bottleneck_passed",
           "export_hf_model", "fsdp_units", "learning_rate", "loss_denominator", "padding_free", "run_settings",
           "sample_accuracy", "score_examples", "selection_rule", "step_metrics", "train_standalone",
           "worker_spec", "write_checkpoint_folder"]
