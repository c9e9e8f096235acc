"""Task specs: a loss and metrics per task, each metric with its direction.

>>> from polytask.tasks import Task, losses, metrics
>>> seg = Task("segmentation", losses.cross_entropy, [lambda: metrics.Segmentation(13)])
"""

from polytask.tasks import losses, metrics
from polytask.tasks.spec import SplitMetrics, Task, TaskSet

__all__ = ["SplitMetrics", "Task", "TaskSet", "losses", "metrics"]
