"""Training: the trainer, its resumable sampler, checkpoints and logs."""

from polytask.train.checkpoint import load_checkpoint, save_checkpoint
from polytask.train.sampler import ResumableBatchSampler
from polytask.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "ResumableBatchSampler",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]
