"""Training: configuration, the loop, checkpoints."""

from sparseroute.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from sparseroute.train.config import RunConfig, TrainConfig, parse_count
from sparseroute.train.loop import RunDirError, TrainingDiverged, evaluate, evaluate_run, train

__all__ = [
    "CheckpointError",
    "RunConfig",
    "RunDirError",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "evaluate_run",
    "latest_checkpoint",
    "load_checkpoint",
    "parse_count",
    "save_checkpoint",
    "train",
]
