"""BAM's teacher-annealed distillation losses (Clark et al., ACL 2019)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polytask
from polytask.distill import BornAgainDistillation
from polytask.errors import InvalidHyperparameterError


def _const_teacher(values) -> nn.Linear:
    """A teacher whose output on zero inputs [B, 1] is ``values`` (its bias) for every row."""
    values = torch.as_tensor(values, dtype=torch.float64)
    teacher = nn.Linear(1, values.numel()).double()
    with torch.no_grad():
        teacher.weight.zero_()
        teacher.bias.copy_(values)
    return teacher


def _bam(total_steps=4, steps=0):
    probs = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    teachers = [_const_teacher(torch.log(probs)), _const_teacher([3.0])]
    bam = BornAgainDistillation(teachers, ["classification", "regression"], total_steps=total_steps)
    for _ in range(steps):
        bam.step()
    return bam


X = torch.zeros(1, 1, dtype=torch.float64)


def test_hand_computed_losses():
    """lambda = 1/4. Classification: teacher softmax (1/4, 1/2, 1/4), gold class 1, so
    target = 1/4 (0, 1, 0) + 3/4 (1/4, 1/2, 1/4) = (3/16, 5/8, 3/16); student softmax
    (1/4, 1/4, 1/2): loss = -(13/16 log 1/4 + 3/16 log 1/2). Regression: gold 1, teacher 3,
    target 1/4 + 9/4 = 5/2; prediction 2: loss (2 - 5/2)^2 = 1/4."""
    bam = _bam(steps=1)
    assert bam.mix == 0.25
    student = [
        torch.log(torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64)).requires_grad_(),
        torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True),
    ]
    targets = [torch.tensor([1]), torch.tensor([[1.0]], dtype=torch.float64)]
    losses = bam(student, targets, inputs=X)
    expected = torch.tensor(
        [-(13 / 16 * math.log(1 / 4) + 3 / 16 * math.log(1 / 2)), 0.25], dtype=torch.float64
    )
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-14)


def test_annealing_is_linear_from_zero_to_one_then_stays():
    bam = _bam(total_steps=4)
    seen = []
    for _ in range(6):
        seen.append(bam.mix)
        bam.step()
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_endpoints_are_pure_distillation_and_pure_supervision():
    """lambda = 0: cross-entropy against the teacher's softmax and squared error against the
    teacher; lambda = 1: torch's own cross-entropy and MSE against the gold labels."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    pred = torch.randn(5, 1, dtype=torch.float64, generator=gen)
    labels = torch.tensor([0, 2, 1, 1, 0])
    y = torch.randn(5, 1, dtype=torch.float64, generator=gen)
    x = torch.zeros(5, 1, dtype=torch.float64)
    start, end = _bam(total_steps=2), _bam(total_steps=2, steps=2)
    teacher_probs = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).expand(5, 3)
    got = start([logits, pred], [labels, y], inputs=x)
    torch.testing.assert_close(got[0], F.cross_entropy(logits, teacher_probs))
    torch.testing.assert_close(got[1], F.mse_loss(pred, torch.full_like(pred, 3.0)))
    got = end([logits, pred], [labels, y], inputs=x)
    torch.testing.assert_close(got[0], F.cross_entropy(logits, labels))
    torch.testing.assert_close(got[1], F.mse_loss(pred, y))


def test_dense_classification_with_class_dimension_one():
    """Segmentation-shaped logits [B, C, H, W] and labels [B, H, W] at lambda = 1 equal
    torch's pixel-wise cross-entropy."""
    teacher = nn.Conv2d(2, 4, 1).double()
    bam = BornAgainDistillation([teacher], ["classification"], total_steps=1)
    bam.step()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 4, (2, 3, 3), generator=gen)
    torch.testing.assert_close(
        bam([logits], [labels], inputs=x)[0], F.cross_entropy(logits, labels)
    )


def test_teachers_are_frozen_in_eval_mode_and_get_no_grad():
    teacher = nn.Sequential(nn.Linear(1, 3), nn.Dropout(0.5)).double()
    bam = BornAgainDistillation([teacher], ["classification"], total_steps=10)
    bam.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    student = nn.Linear(1, 3).double()
    x = torch.ones(4, 1, dtype=torch.float64)
    losses = bam([student(x)], [torch.tensor([0, 1, 2, 0])], inputs=x)
    losses.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # Eval mode: dropout off, so two calls agree.
    assert torch.equal(bam.teachers(x)[0], bam.teachers(x)[0])


def test_composes_with_a_balancing_method_and_mapping_outputs():
    teachers = {"cls": _const_teacher([0.0, 1.0]), "reg": _const_teacher([2.0])}
    bam = BornAgainDistillation(teachers, ["classification", "regression"], total_steps=3)
    encoder = nn.Linear(1, 4).double()
    heads = nn.ModuleDict({"cls": nn.Linear(4, 2), "reg": nn.Linear(4, 1)}).double()
    x = torch.randn(6, 1, dtype=torch.float64)
    z = encoder(x)
    out = {name: head(z) for name, head in heads.items()}
    targets = {"reg": torch.zeros(6, 1, dtype=torch.float64), "cls": torch.zeros(6).long()}
    losses = bam(out, targets, inputs=torch.zeros(6, 1, dtype=torch.float64))
    result = polytask.methods.create("upgrad", 2).backward(
        losses, shared_params=list(encoder.parameters())
    )
    assert result.weights is not None
    assert all(p.grad is not None for p in [*encoder.parameters(), *heads.parameters()])


def test_state_dict_round_trip_keeps_the_schedule():
    bam = _bam(total_steps=8, steps=3)
    buffer = io.BytesIO()
    torch.save(bam.state_dict(), buffer)
    buffer.seek(0)
    restored = _bam(total_steps=8)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert restored.mix == bam.mix == 3 / 8


def test_per_task_inputs():
    bam = _bam()
    student = [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)]
    targets = [torch.tensor([0, 1]), torch.zeros(3, 1, dtype=torch.float64)]
    task_inputs = [torch.zeros(2, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)]
    losses = bam(student, targets, task_inputs=task_inputs)
    torch.testing.assert_close(losses[1], torch.tensor(9.0, dtype=torch.float64))


def test_bad_inputs_are_named():
    bam = _bam()
    good_out = [torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)]
    good_y = [torch.tensor([1]), torch.zeros(1, 1, dtype=torch.float64)]
    with pytest.raises(TypeError, match="exactly one of inputs"):
        bam(good_out, good_y)
    with pytest.raises(ValueError, match="student_outputs has 1 entries but there are 2 tasks"):
        bam(good_out[:1], good_y, inputs=X)
    shape = r"task '0'.*teacher's output has shape \(1, 3\).*\(1, 4\)"
    with pytest.raises(ValueError, match=shape):
        bam([torch.zeros(1, 4, dtype=torch.float64), good_out[1]], good_y, inputs=X)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\]"):
        bam(good_out, [torch.tensor([3]), good_y[1]], inputs=X)
    with pytest.raises(ValueError, match="integer class indices"):
        bam(good_out, [torch.tensor([1.0]), good_y[1]], inputs=X)
    with pytest.raises(ValueError, match=r"task '1' \(regression\)"):
        bam(good_out, [good_y[0], torch.zeros(2, dtype=torch.float64)], inputs=X)
    named = BornAgainDistillation({"a": _const_teacher([1.0])}, ["regression"], total_steps=1)
    with pytest.raises(ValueError, match=r"keys \['b'\].*\['a'\]"):
        named({"b": torch.zeros(1, 1)}, {"b": torch.zeros(1, 1)}, inputs=X)


@pytest.mark.parametrize(
    ("kinds", "total_steps", "match"),
    [
        (["classification"], 5, "one of"),
        (["classification", "ranking"], 5, r"\['ranking'\]"),
        (["classification", "regression"], 0, "total_steps=0"),
    ],
)
def test_bad_construction(kinds, total_steps, match):
    teachers = [_const_teacher([0.0, 1.0]), _const_teacher([1.0])]
    with pytest.raises(InvalidHyperparameterError, match=match):
        BornAgainDistillation(teachers, kinds, total_steps=total_steps)
    with pytest.raises(InvalidHyperparameterError, match=r"not an nn\.Module"):
        BornAgainDistillation([lambda x: x], ["regression"], total_steps=1)
    with pytest.raises(InvalidHyperparameterError, match="empty"):
        BornAgainDistillation([], [], total_steps=1)
