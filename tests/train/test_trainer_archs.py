"""Every registered architecture trains under the Trainer (its tiny example, one epoch)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

import polytask
from polytask.tasks import Task, TaskSet, metrics
from polytask.train import TrainConfig, Trainer

from ..archs._examples import load_examples

EXAMPLES = load_examples()


class _Copies(Dataset):
    """The example batch's samples, each with all-zero targets of its outputs' shapes."""

    def __init__(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        self.x, self.outputs = x, outputs

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {t: torch.zeros_like(o[i]) for t, o in self.outputs.items()}


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.float() - target.float()).pow(2).mean()


@pytest.mark.parametrize("name", polytask.archs.available())
def test_architecture_trains_under_the_trainer(name):
    torch.manual_seed(0)
    ex = EXAMPLES[name]()
    if not isinstance(ex.x, torch.Tensor):
        pytest.skip("the example's input is not a single tensor batch")
    model = ex.model
    model.eval()
    with torch.no_grad():
        outputs = model(ex.x)
    tasks = TaskSet([Task(t, _mse, [lambda: metrics.MeanError("mse")]) for t in model.tasks])
    trainable_shared = any(p.requires_grad for p in model.shared_parameters())
    method = polytask.methods.create("mgda" if trainable_shared else "ew", model.num_tasks)
    data = _Copies(ex.x, outputs)
    trainer = Trainer(
        model,
        tasks,
        method,
        lambda params: torch.optim.SGD(params, lr=1e-3),
        data,
        data,
        config=TrainConfig(epochs=1, batch_size=len(data), select="loss"),
    )
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.fit()
    assert result.best_epoch == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_astmt_discriminator_learns_through_loss_terms():
    torch.manual_seed(0)
    ex = EXAMPLES["astmt"]()
    model = ex.model
    with torch.no_grad():
        outputs = model(ex.x)
    tasks = TaskSet([Task(t, _mse) for t in model.tasks])
    data = _Copies(ex.x, outputs)
    disc = [p.detach().clone() for p in model.discriminator_parameters()]
    Trainer(
        model,
        tasks,
        polytask.methods.create("ew", model.num_tasks),
        lambda params: torch.optim.SGD(params, lr=1e-2),
        data,
        data,
        config=TrainConfig(epochs=1, batch_size=len(data), select="loss"),
    ).fit()
    moved = [not torch.equal(a, p) for a, p in zip(disc, model.discriminator_parameters())]
    assert disc and all(moved)
