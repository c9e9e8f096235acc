"""Knowledge distillation from single-task teachers into a multi-task student.

Each loss is an ``nn.Module`` that returns one loss term per task ([K]), so it composes with
any balancing method (``method.backward(losses, shared_params=...)``); the teachers are frozen
and stay in eval mode.

* :class:`BornAgainDistillation`: BAM's targets mixing gold labels and teacher predictions,
  with teacher annealing (Clark et al., ACL 2019).
* :class:`FeatureDistillation`: feature matching through task-specific adaptors
  (Li & Bilen, ECCV Workshops 2020).

With :class:`polytask.train.Trainer`, pass BAM as ``train_loss=``: it replaces the task
losses in training, its annealing steps with the optimizer and is checkpointed. Feature
distillation is added to the task losses (``lambda out, y, inputs, features: task_losses +
w * feature_distill(features, inputs=inputs)``, with ``mode="features"`` so that the trainer
passes the shared representation) and its adaptors go to the optimizer.
"""

from polytask.distill.born_again import KINDS, BornAgainDistillation
from polytask.distill.feature import ChannelAdaptor, FeatureDistillation, normalize_channels

__all__ = [
    "KINDS",
    "BornAgainDistillation",
    "ChannelAdaptor",
    "FeatureDistillation",
    "normalize_channels",
]
