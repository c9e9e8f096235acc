"""Feature distillation through task adaptors (Li & Bilen, ECCV Workshops 2020)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytask.distill import ChannelAdaptor, FeatureDistillation, normalize_channels
from polytask.errors import InvalidHyperparameterError


def _fixed(weight) -> nn.Linear:
    """A teacher whose features are ``x @ weight.T`` (frozen by the distillation module)."""
    weight = torch.as_tensor(weight, dtype=torch.float64)
    teacher = nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        teacher.weight.copy_(weight)
    return teacher


def test_hand_computed_loss():
    """Adaptor = identity, student features (3, 4), teacher features (1, 0):
    L = ||(3, 4)/sqrt(25 + 1e-6) - (1, 0)/sqrt(1 + 1e-6)||^2 (about 0.8)."""
    kd = FeatureDistillation([_fixed([[1.0, 0.0], [0.0, 0.0]])], 2, 2)
    with torch.no_grad():
        kd.adaptors[0].weight.copy_(torch.eye(2))
    student = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    loss = kd(student, inputs=torch.tensor([[1.0, 5.0]], dtype=torch.float64))
    a = (3 / math.sqrt(25 + 1e-6), 4 / math.sqrt(25 + 1e-6))
    b = (1 / math.sqrt(1 + 1e-6), 0.0)
    expected = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    assert abs(expected - 0.8) < 1e-6
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))


def test_feature_maps_match_a_conv_reference():
    """On [B, C, H, W] maps: the adaptor is a bias-free 1x1 convolution, the normalisation is
    over channels at each pixel and the loss the mean over batch and pixels of the squared
    distance, recomputed here with F.conv2d."""
    gen = torch.Generator().manual_seed(0)
    teachers = [nn.Conv2d(3, 5, 1).double(), nn.Conv2d(3, 2, 3, padding=1).double()]
    kd = FeatureDistillation(teachers, student_channels=4, teacher_channels=[5, 2])
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen)
    f_s = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=gen)
    losses = kd(f_s, inputs=x)
    for k, teacher in enumerate(teachers):
        mapped = F.conv2d(f_s, kd.adaptors[k].weight.to(f_s)[:, :, None, None])
        f_t = teacher(x)
        a = mapped / torch.sqrt((mapped**2).sum(1, keepdim=True) + 1e-6)
        b = f_t / torch.sqrt((f_t**2).sum(1, keepdim=True) + 1e-6)
        expected = ((a - b) ** 2).sum(1).mean()
        torch.testing.assert_close(losses[k], expected.detach())


def test_teachers_get_no_grad_and_adaptors_learn():
    """Teacher k's features are a fixed linear map of the student's: Adam on the adaptors
    alone (the official optimiser, lr 0.1) drives the losses near zero; teachers stay frozen."""
    gen = torch.Generator().manual_seed(1)
    maps = [torch.randn(3, 4, dtype=torch.float64, generator=gen) for _ in range(2)]
    teachers = [_fixed(m) for m in maps]
    kd = FeatureDistillation(teachers, 4, 3)
    optimizer = torch.optim.Adam(kd.adaptor_parameters(), lr=0.1)
    x = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    first = kd(x, inputs=x).detach()
    for _ in range(200):
        optimizer.zero_grad()
        kd(x, inputs=x).sum().backward()
        optimizer.step()
    last = kd(x, inputs=x).detach()
    assert torch.all(first > 0.1) and torch.all(last < 1e-3), (first, last)
    assert all(p.grad is None and not p.requires_grad for t in teachers for p in t.parameters())
    assert [p.shape for p in kd.adaptor_parameters()] == [(3, 4), (3, 4)]


def test_student_gets_the_gradient_and_teachers_stay_in_eval():
    teacher = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5)).double()
    kd = FeatureDistillation([teacher], 4, 3).train()
    assert not teacher.training
    student = nn.Linear(2, 4).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    kd(student(x), inputs=x).sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_loss_ignores_the_scale_of_either_side():
    """Both sides are normalised per position: scaling the teacher's or the student's features
    by a positive factor leaves the loss unchanged (up to the 1e-6 under the root)."""
    gen = torch.Generator().manual_seed(2)
    kd = FeatureDistillation([_fixed(torch.randn(3, 3, dtype=torch.float64, generator=gen))], 3, 3)
    x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    base = kd(x, inputs=x)
    torch.testing.assert_close(kd(10 * x, inputs=x), base, rtol=1e-5, atol=1e-9)
    scaled = FeatureDistillation([_fixed(7 * kd.teachers.modules_[0].weight)], 3, 3)
    scaled.adaptors.load_state_dict(kd.adaptors.state_dict())
    torch.testing.assert_close(scaled(x, inputs=x), base, rtol=1e-5, atol=1e-9)
    norms = normalize_channels(x).norm(dim=1)
    torch.testing.assert_close(norms, x.norm(dim=1) / torch.sqrt(x.norm(dim=1) ** 2 + 1e-6))


def test_state_dict_round_trip_restores_the_adaptors():
    teacher = _fixed(torch.eye(3))
    kd = FeatureDistillation([teacher], 3, 3)
    buffer = io.BytesIO()
    torch.save(kd.state_dict(), buffer)
    buffer.seek(0)
    other = FeatureDistillation([_fixed(torch.eye(3))], 3, 3)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(other.adaptors[0].weight, kd.adaptors[0].weight)


def test_per_task_inputs_take_per_task_student_features():
    teachers = [_fixed(torch.eye(2)), _fixed(-torch.eye(2))]
    kd = FeatureDistillation(teachers, 2, 2)
    with torch.no_grad():
        for a in kd.adaptors:
            a.weight.copy_(torch.eye(2))
    xs = [torch.randn(3, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)]
    losses = kd(xs, task_inputs=xs)
    # Task 0's teacher copies its input (loss 0); task 1's negates it (loss 4, up to eps).
    expected = torch.tensor([0.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=0)


def test_bad_inputs_are_named():
    kd = FeatureDistillation([_fixed(torch.eye(3))], 3, 3)
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="student_channels=3"):
        kd(torch.zeros(2, 4, dtype=torch.float64), inputs=x)
    with pytest.raises(ValueError, match=r"tensor \[B, C_s, \.\.\.\]"):
        kd(torch.zeros(3, dtype=torch.float64), inputs=x)
    wrong = FeatureDistillation([_fixed(torch.eye(3))], 3, 4)
    with pytest.raises(ValueError, match=r"teacher's features have shape \(2, 3\).*\(2, 4\)"):
        wrong(x, inputs=x)
    with pytest.raises(TypeError, match="exactly one of inputs"):
        kd(x, inputs=x, task_inputs=[x])
    with pytest.raises(ValueError, match=r"expects features \[B, 2"):
        ChannelAdaptor(2, 2)(torch.zeros(1, 3))


@pytest.mark.parametrize(
    ("student", "teacher_channels", "match"),
    [
        (3, [3, 3], "2 entries but there are 1"),
        (0, 3, "channel count 0"),
        (3, "3", "an int or one int per task"),
    ],
)
def test_bad_construction(student, teacher_channels, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        FeatureDistillation([_fixed(torch.eye(3))], student, teacher_channels)
