"""The trainer: selection on validation only, exact resume, determinism, accumulation, logs."""

from __future__ import annotations

import json

import pytest
import torch

import polytask
from polytask.errors import InvalidContextError
from polytask.train import TrainConfig, Trainer

from ._tiny import TinyNet, TwoTaskData, tiny_tasks


def make_trainer(method="pcgrad", out_dir=None, *, seed=0, train=None, **config):
    torch.manual_seed(seed)
    model = TinyNet()
    cfg = TrainConfig(**{"epochs": 2, "batch_size": 8, "seed": seed, **config})
    return Trainer(
        model,
        tiny_tasks(),
        polytask.methods.create(method, 2, **({"seed": 0} if method == "pcgrad" else {})),
        lambda params: torch.optim.Adam(params, lr=1e-2),
        train if train is not None else TwoTaskData(40, 0),
        TwoTaskData(16, 1),
        TwoTaskData(16, 2),
        config=cfg,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
        out_dir=out_dir,
    )


def params_of(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_fit_selects_on_validation_and_reports_test_at_that_epoch(tmp_path):
    result = make_trainer(out_dir=tmp_path, epochs=3).fit()
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    scores = [r["score"] for r in result.history]
    assert result.best_epoch == 1 + scores.index(min(scores))
    best = result.history[result.best_epoch - 1]
    assert result.val == best["val"] and result.test == best["test"]
    assert set(result.val) == {"reg/mae", "cls/acc"}


@pytest.mark.parametrize(("method", "mode"), [("pcgrad", "params"), ("nash_mtl", "features")])
def test_killed_run_resumes_to_the_same_numbers(tmp_path, method, mode):
    full = make_trainer(method, tmp_path / "full", mode=mode, checkpoint_every=2)
    expected = full.fit()
    # 40 samples / 8 = 5 steps per epoch: stop mid-epoch 1, then again mid-epoch 2.
    killed = make_trainer(method, tmp_path / "killed", mode=mode, checkpoint_every=2)
    killed.fit(stop_after_steps=3)
    again = make_trainer(method, tmp_path / "killed", mode=mode, checkpoint_every=2, seed=0)
    again.fit(resume=True, stop_after_steps=4)
    resumed = make_trainer(method, tmp_path / "killed", mode=mode, checkpoint_every=2)
    got = resumed.fit(resume=True)
    for a, b in zip(params_of(full), params_of(resumed)):
        assert torch.equal(a, b)
    assert got.history == expected.history
    assert got.best_epoch == expected.best_epoch and got.test == expected.test
    assert resumed.method.state_dict().keys() == full.method.state_dict().keys()


def test_deterministic_under_seed():
    a, b = make_trainer(), make_trainer()
    ra, rb = a.fit(), b.fit()
    assert ra.history == rb.history
    for x, y in zip(params_of(a), params_of(b)):
        assert torch.equal(x, y)


def test_accumulation_averages_micro_batches():
    # EW on the mean losses: two micro-batches of 4 == one batch of 8 (no dropout in eval of
    # gradients: make the model deterministic by switching dropout off).
    # SGD, not Adam: Adam's update hardly depends on the gradient's scale.
    def run(**cfg):
        t = make_trainer("ew", epochs=1, **cfg)
        t.model.encoder[2].p = 0.0
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.1)
        t.scheduler = None
        t.fit()
        return params_of(t)

    plain = run(batch_size=8)
    for x, y in zip(plain, run(batch_size=4, accumulate=2)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # 40 samples in batches of 3 with accumulate 3: 14 micro-batches, the last group of 2.
    assert any(not torch.equal(x, y) for x, y in zip(plain, run(batch_size=3, accumulate=3)))


def test_log_records_losses_and_weights(tmp_path):
    make_trainer("mgda", tmp_path, epochs=1).fit()
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 5
    assert all(len(e["losses"]) == 2 and len(e["weights"]) == 2 for e in steps)
    evals = [e for e in events if e["event"] == "eval"]
    assert {(e["split"], e["epoch"]) for e in evals} == {("val", 0), ("val", 1), ("test", 1)}


def test_bf16_runs():
    result = make_trainer("ew", epochs=1, precision="bf16").fit()
    assert result.best_epoch == 1


@pytest.mark.parametrize("method", ["mgda", "nash_mtl", "uw"])
def test_fp16_with_loss_scaling_trains(method, tmp_path):
    t = make_trainer(method, tmp_path, epochs=4, precision="fp16")
    assert t.scaler.is_enabled()
    result = t.fit()
    first, last = result.history[0]["train_losses"], result.history[-1]["train_losses"]
    assert sum(last) < sum(first)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert "scale" in torch.load(tmp_path / "last.pt", weights_only=False)["scaler"]


def test_method_parameters_are_optimised():
    t = make_trainer("imtl_l", epochs=1)
    before = t.method.loss_scale.detach().clone()
    t.fit()
    assert not torch.equal(before, t.method.loss_scale.detach())


def test_missing_labels_mark_the_task_absent():
    # GradVac keeps per-pair state, so it cannot take a step that lacks a task.
    assert not polytask.methods.get("gradvac").partial_tasks
    t = make_trainer("gradvac", epochs=1, train=TwoTaskData(16, 0, missing_b=True))
    with pytest.raises(InvalidContextError, match="only some tasks"):
        t.fit()


PARTIAL = [
    n
    for n in polytask.methods.available()
    if polytask.methods.get(n).partial_tasks and not polytask.methods.get(n).needs
]


@pytest.mark.parametrize("method", PARTIAL[:3])
def test_absent_task_head_is_left_alone(method):
    t = make_trainer(method, epochs=1, train=TwoTaskData(16, 0, missing_b=True))
    before = [p.detach().clone() for p in t.model.heads["cls"].parameters()]
    t.fit()
    for a, p in zip(before, t.model.heads["cls"].parameters()):
        assert torch.equal(a, p.detach())


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="precision='fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="select='cls/f1'"):
        make_trainer(epochs=1, select="cls/f1").fit()
    with pytest.raises(ValueError, match="created for 3 tasks"):
        Trainer(
            TinyNet(),
            tiny_tasks(),
            polytask.methods.create("ew", 3),
            torch.optim.SGD,
            TwoTaskData(8, 0),
            TwoTaskData(8, 1),
        )


def test_optimizer_must_hold_method_parameters():
    with pytest.raises(ValueError, match="does not hold the method's parameters"):
        Trainer(
            TinyNet(),
            tiny_tasks(),
            polytask.methods.create("imtl_l", 2),
            lambda params: torch.optim.SGD(list(params)[:2], lr=0.1),
            TwoTaskData(8, 0),
            TwoTaskData(8, 1),
        )


def _sgd_trainer(method, *, lr, mode="features"):
    """One epoch of batches of 4 on 8 samples, SGD, selected on the loss."""
    return Trainer(
        TinyNet(),
        tiny_tasks(),
        method,
        lambda params: torch.optim.SGD(params, lr=lr),
        TwoTaskData(8, 0),
        TwoTaskData(8, 1),
        config=TrainConfig(epochs=1, batch_size=4, mode=mode, select="loss"),
    )


def test_method_parameters_created_at_the_first_step_are_an_error():
    # RotoGrad without latent_size builds its rotations at its first backward, after the
    # optimizer: they would never train.
    t = _sgd_trainer(polytask.methods.create("rotograd", 2), lr=0.1)
    with pytest.warns(UserWarning, match="RotoGrad created its rotations"):
        with pytest.raises(ValueError, match="latent_size"):
            t.fit()
    _sgd_trainer(polytask.methods.create("rotograd", 2, latent_size=16), lr=0.1).fit()


def test_rotograd_heads_read_the_rotated_representation():
    """As in the paper (and its official code, which puts R_k in front of head k), the
    Trainer feeds head k the rotated representation R_k z, in training and in evaluation;
    the rotations are trained by RotoGrad's objective."""
    torch.manual_seed(0)
    method = polytask.methods.create("rotograd", 2, latent_size=16)
    with torch.no_grad():
        method.rotation.generator_params.normal_(0, 0.5)
    t = _sgd_trainer(method, lr=0.05)
    before = method.rotation.generator_params.detach().clone()
    t.fit()
    assert not torch.equal(before, method.rotation.generator_params)  # trained
    data = TwoTaskData(8, 1)
    model = t.model.eval()
    with torch.no_grad():
        z = model.encode(data.x)
        r = method.rotation.matrices()
        rotated = torch.nn.functional.mse_loss(model.decode(z @ r[0].T, "reg"), data.reg)
        plain = torch.nn.functional.mse_loss(model(data.x)["reg"], data.reg)
    val = t.evaluate("val")
    assert val["losses"][0] == pytest.approx(float(rotated), rel=1e-5)
    assert val["losses"][0] != pytest.approx(float(plain), rel=1e-3)
    with pytest.raises(ValueError, match="needs mode='features'"):
        _sgd_trainer(polytask.methods.create("rotograd", 2, latent_size=16), lr=0.05, mode="params")


@pytest.mark.parametrize("method", ["auto_lambda", "moml"])
def test_meta_methods_learn_their_weights_in_the_trainer(method, tmp_path):
    t = make_trainer(method, tmp_path / "a", epochs=1)
    before = t.method.task_weights().clone()
    t.fit()
    assert not torch.equal(before, t.method.task_weights())
    # Their weights are not in the model's optimizer (they have their own meta optimizer).
    held = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in t.method.parameters())


def test_meta_method_resumes_exactly(tmp_path):
    full = make_trainer("auto_lambda", tmp_path / "full")
    full.fit()
    killed = make_trainer("auto_lambda", tmp_path / "killed")
    killed.fit(stop_after_steps=3)
    resumed = make_trainer("auto_lambda", tmp_path / "killed")
    resumed.fit(resume=True)
    assert torch.equal(full.method.task_weights(), resumed.method.task_weights())
    for a, b in zip(params_of(full), params_of(resumed)):
        assert torch.equal(a, b)


def test_sequential_reptile_steps_through_its_meta_step():
    t = make_trainer("sequential_reptile", epochs=1)
    before = params_of(t)
    result = t.fit()
    assert t.step == 5 and result.best_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(t)))


def test_plateau_scheduler_steps_on_the_validation_score():
    t = make_trainer("ew", epochs=3, select="loss")
    t.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(t.optimizer, patience=0, factor=0.5)
    seen = []
    t.scheduler.step = lambda metric: seen.append(metric)  # type: ignore[method-assign]
    result = t.fit()
    assert seen == [r["score"] for r in result.history]


def test_gradient_clipping_bounds_the_step():
    t = make_trainer("mgda", epochs=1, grad_clip=1e-3)
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=1.0)
    t.scheduler = None
    seen = []
    original = t.optimizer.step

    def step(*args, **kwargs):
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in t.model.parameters() if p.grad is not None])
        )
        seen.append(float(norm))
        return original(*args, **kwargs)

    t.optimizer.step = step  # type: ignore[method-assign]
    t.fit()
    assert len(seen) == 5 and max(seen) <= 1e-3 * (1 + 1e-5)


def test_tensorboard_needs_its_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        make_trainer("ew", tmp_path, epochs=1, tensorboard=True)


def test_born_again_distillation_trains_through_the_trainer(tmp_path):
    from torch import nn

    from polytask.distill import BornAgainDistillation

    torch.manual_seed(1)
    teachers = {
        "reg": nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1), nn.Flatten(0)),
        "cls": nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)),
    }
    bam = BornAgainDistillation(teachers, ["regression", "classification"], total_steps=10)
    t = make_trainer("ew", tmp_path, epochs=2)
    t = Trainer(
        t.model,
        t.tasks,
        t.method,
        lambda params: torch.optim.Adam(params, lr=1e-2),
        TwoTaskData(40, 0),
        TwoTaskData(16, 1),
        config=TrainConfig(epochs=2, batch_size=8),
        train_loss=bam,
        out_dir=tmp_path,
    )
    result = t.fit()
    assert result.best_epoch in (1, 2)
    assert bam.mix == 1.0  # 10 optimizer steps: the annealing reached pure supervision
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["train_loss"]
    assert int(saved["steps_done"]) == 10
    assert all(p.grad is None for p in bam.teachers.parameters())
