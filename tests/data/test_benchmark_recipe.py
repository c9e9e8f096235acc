"""The learning-rate schedules of :class:`polytask.data.benchmark.Recipe`."""

import itertools
import math

import pytest
import torch

from polytask.data import benchmark as benchmarks
from polytask.data.benchmark import Recipe


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def test_poly_is_lr_times_one_minus_progress_to_the_power():
    # Vandenhende et al.'s adjust_learning_rate: lr * (1 - epoch / epochs) ** 0.9.
    opt = _optimizer(0.1)
    sched = Recipe(epochs=10, scheduler="poly").make_scheduler(opt)
    seen = [_lr(opt)]
    for _ in range(10):
        opt.step()
        sched.step()
        seen.append(_lr(opt))
    # By hand: 0.5 ** 0.9 = 0.5358867..., 0.9 ** 0.9 = 0.9095325..., 0.1 ** 0.9 = 0.1258925...
    assert seen[0] == pytest.approx(0.1)
    assert seen[1] == pytest.approx(0.1 * 0.9095325, rel=1e-6)
    assert seen[5] == pytest.approx(0.1 * 0.5358867, rel=1e-6)
    assert seen[9] == pytest.approx(0.1 * 0.1258925, rel=1e-6)
    assert seen[10] == 0.0
    assert all(a > b for a, b in itertools.pairwise(seen))


def test_poly_power_is_a_recipe_field_and_clamps_past_the_end():
    opt = _optimizer(1.0)
    sched = Recipe(epochs=4, scheduler="poly").override({"poly_power": "2"}).make_scheduler(opt)
    values = []
    for _ in range(6):
        values.append(_lr(opt))
        opt.step()
        sched.step()
    assert values == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0])


def test_plateau_reduces_after_patience_epochs_without_improvement():
    opt = _optimizer(1.0)
    recipe = Recipe(scheduler="plateau", plateau_factor=0.7, plateau_patience=5, min_lr=0.5)
    sched = recipe.make_scheduler(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    sched.step(1.0)  # the first score is the best so far
    for _ in range(5):  # patience epochs without a lower score: no change yet
        sched.step(1.0)
        assert _lr(opt) == 1.0
    sched.step(1.0)  # the sixth non-improving epoch reduces
    assert _lr(opt) == pytest.approx(0.7)
    sched.step(0.5)  # a lower score resets the count
    for _ in range(5):
        sched.step(0.6)
    assert _lr(opt) == pytest.approx(0.7)
    sched.step(0.6)
    assert _lr(opt) == pytest.approx(0.5)  # 0.49 is floored at min_lr


def test_qm9_recipe_is_nash_mtls_plateau_schedule():
    recipe = benchmarks.get("qm9").recipe
    assert (recipe.scheduler, recipe.plateau_factor, recipe.plateau_patience) == (
        "plateau",
        0.7,
        5,
    )
    assert recipe.min_lr == 1e-5 and recipe.lr == 1e-3
    sched = recipe.make_scheduler(_optimizer(recipe.lr))
    assert sched.mode == "min" and math.isclose(sched.min_lrs[0], 1e-5)


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="'poly' or 'plateau'"):
        Recipe(scheduler="linear").make_scheduler(_optimizer(0.1))
