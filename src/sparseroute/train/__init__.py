"""Training: configuration, the loop, checkpoints."""

from sparseroute.train.checkpoint import (
    CheckpointError,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from sparseroute.train.config import RunConfig, TrainConfig, apply_setting, load_settings, parse_count, resolve_run
from sparseroute.train.corpus import prepare_run
from sparseroute.train.loop import (
    RunBusy,
    RunDirError,
    TrainingDiverged,
    build_model,
    evaluate_run,
    load_run_model,
    train,
)

__all__ = [
    "CheckpointError",
    "RunConfig",
    "RunBusy",
    "RunDirError",
    "TrainConfig",
    "TrainingDiverged",
    "apply_setting",
    "load_settings",
    "prepare_run",
    "resolve_run",
    "build_model",
    "evaluate_run",
    "load_run_model",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "parse_count",
    "save_checkpoint",
    "train",
]
