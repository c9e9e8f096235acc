"""Hard parameter sharing: the split point, per-task copies, heads, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polytask
from polytask.archs.backbones import MLP, resnet18
from polytask.archs.hard_sharing import HardSharing

TASKS = ["a", "b", "c"]


def stages() -> list[nn.Module]:
    torch.manual_seed(0)
    return [MLP([4, 5], activate_last=True), MLP([5, 6], activate_last=True), nn.Linear(6, 3)]


def heads() -> dict[str, nn.Module]:
    return {t: nn.Linear(3, 2) for t in TASKS}


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_whole_encoder_is_shared():
    encoder = nn.Sequential(*stages())
    model = HardSharing(TASKS, encoder, heads())
    assert model.encoder is encoder
    assert ids(model.shared_parameters()) == ids(encoder.parameters())
    x = torch.randn(7, 4)
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](encoder(x)))
        assert ids(model.task_parameters(t)) == ids(model.heads[t].parameters())


def test_split_zero_is_independent_networks_per_task():
    given = stages()
    model = HardSharing(TASKS, given, heads(), split=0)
    assert list(model.shared_parameters()) == []
    x = torch.randn(7, 4)
    torch.testing.assert_close(model.encode(x), x)  # nothing shared: the input itself
    # Each task's network starts from the given stages' weights ...
    reference = nn.Sequential(*given)
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](reference(x)))
    # ... but owns its copy: changing task a's network changes no other task's output.
    with torch.no_grad():
        for p in model.towers["a"].parameters():
            p.add_(1.0)
    after = model(x)
    assert not torch.allclose(after["a"], out["a"])
    for t in ("b", "c"):
        torch.testing.assert_close(after[t], out[t])
    tower_params = [ids(model.towers[t].parameters()) for t in TASKS]
    assert all(not (p & q) for i, p in enumerate(tower_params) for q in tower_params[i + 1 :])
    assert not ids(reference.parameters()) & ids(model.parameters())  # the given stages are copied


@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_shares_the_leading_stages(split):
    given = stages()
    model = HardSharing(TASKS, given, heads(), split=split)
    assert ids(model.shared_parameters()) == {id(p) for s in given[:split] for p in s.parameters()}
    for t in TASKS:
        own = ids(model.task_parameters(t))
        assert own == ids(model.towers[t].parameters()) | ids(model.heads[t].parameters())
        assert len(model.towers[t]) == 3 - split
    x = torch.randn(5, 4)
    out = model(x)
    reference = nn.Sequential(*given)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](reference(x)))
        torch.testing.assert_close(model(x, task=t), out[t])
    # A task's loss moves the shared stages and its own copy, never another task's copy.
    if split < 3:
        grads = torch.autograd.grad(
            out["a"].sum(),
            [*model.towers["b"].parameters(), *model.towers["a"].parameters()],
            allow_unused=True,
        )
        n_b = len(list(model.towers["b"].parameters()))
        assert all(g is None for g in grads[:n_b])
        assert all(g is not None for g in grads[n_b:])


def test_split_accepts_sequential_and_module_list():
    for container in (nn.Sequential(*stages()), nn.ModuleList(stages())):
        model = HardSharing(TASKS, container, heads(), split=1)
        assert len(model.encoder) == 1 and len(model.towers["a"]) == 2


def test_resnet_stages_split_like_the_mtan_split_baseline():
    # Share the stem and layer1..3 of a ResNet, copy layer4 per task.
    torch.manual_seed(0)
    net = resnet18()
    task_heads = [nn.Conv2d(512, 2, 1), nn.Conv2d(512, 1, 1)]
    model = HardSharing(["seg", "depth"], net.stages(), task_heads, split=4)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out["seg"], task_heads[0](net.eval()(x)))
    assert out["depth"].shape == (1, 1, 1, 1)


def test_heads_as_list_and_as_one_module_copied_per_task():
    listed = [nn.Linear(3, k + 1) for k in range(3)]
    model = HardSharing(TASKS, nn.Identity(), listed)
    assert [model.heads[t] for t in TASKS] == listed
    one = nn.Linear(3, 2)
    model = HardSharing(TASKS, nn.Identity(), one)
    x = torch.randn(4, 3)
    out = model(x)
    for t in TASKS:
        assert model.heads[t] is not one
        torch.testing.assert_close(out[t], one(x))


def test_registry_and_suite_contract():
    model = polytask.archs.create(
        "hard_sharing", tasks=2, encoder=nn.Linear(4, 3), heads=heads()["a"]
    )
    assert model.tasks == ("task0", "task1") and model.has_shared_representation
    model.check_partition()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"encoder": stages(), "heads": heads()}, TypeError, "split"),
        ({"encoder": nn.Linear(4, 3), "heads": heads(), "split": 1}, TypeError, "list of stage"),
        ({"encoder": stages(), "heads": heads(), "split": 4}, ValueError, "split=4"),
        ({"encoder": stages(), "heads": heads(), "split": -1}, ValueError, "split=-1"),
        ({"encoder": [], "heads": heads(), "split": 0}, ValueError, "empty"),
        ({"encoder": nn.Identity(), "heads": {"a": nn.Identity()}}, ValueError, "one head per"),
        ({"encoder": nn.Identity(), "heads": [nn.Identity()]}, ValueError, "1 modules for 3"),
        ({"encoder": nn.Identity(), "heads": "linear"}, TypeError, "heads must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        HardSharing(TASKS, **kwargs)


def test_a_module_in_two_places_is_an_error():
    shared_head = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="same head module"):
        HardSharing(TASKS, nn.Identity(), [shared_head, shared_head, nn.Linear(3, 2)])
    encoder = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="both the shared encoder and task 'a'"):
        HardSharing(TASKS, encoder, [encoder[1], nn.Linear(3, 2), nn.Linear(3, 2)])
    common = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="task 'b'"):
        HardSharing(
            ["a", "b"],
            nn.Identity(),
            [nn.Sequential(common, nn.ReLU()), nn.Sequential(common, nn.Tanh())],
        )


def test_deepcopy_keeps_the_partition():
    model = HardSharing(TASKS, stages(), heads(), split=1)
    clone = copy.deepcopy(model)
    clone.check_partition()
    assert len(list(clone.shared_parameters())) == len(list(model.shared_parameters()))
