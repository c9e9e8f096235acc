"""Hierarchical MTL (Søgaard & Goldberg 2016, HMTL, JMT): depths, shortcuts, partition,
and JMT's successive regularisation."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import polytask
from polytask.archs.hierarchical import Hierarchical
from polytask.errors import PolytaskError

EMB, HID = 3, 4


class Recorder(nn.Module):
    """A linear stage that remembers its inputs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return torch.tanh(self.linear(x))


def build(shortcut=None, depths=(1, 2, 3), sr=False, **kw) -> Hierarchical:
    torch.manual_seed(0)
    extra = EMB if shortcut == "concat" else 0
    emb = HID if shortcut == "add" else EMB  # 'add' needs equal widths
    stages = [Recorder(emb, HID), Recorder(HID + extra, HID), Recorder(HID + extra, HID)]
    return Hierarchical(
        ["pos", "chunk", "dep"],
        stages=stages,
        heads={"pos": nn.Linear(HID, 5), "chunk": nn.Linear(HID, 3), "dep": nn.Linear(HID, 2)},
        depths=depths,
        embedding=nn.Embedding(11, emb),
        shortcut=shortcut,
        successive_regularization=sr,
        **kw,
    )


def tokens() -> torch.Tensor:
    return torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))


def ids(params) -> set[int]:
    return {id(p) for p in params}


# ---------------------------------------------------------------------------------------
# depths


def test_task_reads_its_own_depth():
    model = build()
    x = tokens()
    out = model(x)
    e = model.embedding(x)
    h1 = model.stages[0](e)
    h2 = model.stages[1](h1)
    h3 = model.stages[2](h2)
    torch.testing.assert_close(out["pos"], model.heads["pos"](h1))
    torch.testing.assert_close(out["chunk"], model.heads["chunk"](h2))
    torch.testing.assert_close(out["dep"], model.heads["dep"](h3))


def test_a_task_does_not_depend_on_stages_above_its_depth():
    model = build()
    x = tokens()
    out = model(x)
    above = [*model.stages[1].parameters(), *model.stages[2].parameters()]
    grads = torch.autograd.grad(out["pos"].sum(), above, allow_unused=True)
    assert all(g is None for g in grads)
    # Perturbing the stages above leaves the low task's output unchanged ...
    with torch.no_grad():
        for p in above:
            p.add_(1.0)
    torch.testing.assert_close(model(x)["pos"], out["pos"])
    # ... and forward(x, task) does not even run them.
    for s in model.stages:
        s.inputs.clear()
    model(x, task="pos")
    assert [len(s.inputs) for s in model.stages] == [1, 0, 0]
    model(x, task="chunk")
    assert [len(s.inputs) for s in model.stages] == [2, 1, 0]


def test_shortcut_concat_feeds_the_embeddings_to_every_higher_stage():
    model = build(shortcut="concat")
    x = tokens()
    model(x)
    e = model.embedding(x)
    h1 = model.stages[0].linear(e).tanh()
    torch.testing.assert_close(model.stages[0].inputs[-1], e)
    torch.testing.assert_close(model.stages[1].inputs[-1], torch.cat([h1, e], dim=-1))
    h2 = model.stages[1].inputs[-1] @ model.stages[1].linear.weight.T
    h2 = (h2 + model.stages[1].linear.bias).tanh()
    torch.testing.assert_close(model.stages[2].inputs[-1], torch.cat([h2, e], dim=-1))


def test_shortcut_add():
    model = build(shortcut="add")
    x = tokens()
    model(x)
    e = model.embedding(x)
    h1 = model.stages[0].linear(e).tanh()
    torch.testing.assert_close(model.stages[1].inputs[-1], h1 + e)


def test_shortcut_dim_for_images():
    torch.manual_seed(0)
    conv = lambda cin: nn.Conv2d(cin, 4, 3, padding=1)  # noqa: E731
    model = Hierarchical(
        ["edges", "seg"],
        stages=[conv(3), conv(7)],
        heads=[nn.Conv2d(4, 1, 1), nn.Conv2d(4, 2, 1)],
        depths=[1, 2],
        shortcut="concat",
        shortcut_dim=1,
    )
    out = model(torch.randn(2, 3, 8, 8))
    assert out["edges"].shape == (2, 1, 8, 8) and out["seg"].shape == (2, 2, 8, 8)


# ---------------------------------------------------------------------------------------
# partition


def test_stages_below_the_second_highest_depth_are_shared():
    # Depths 1 and 3 over three stages (Søgaard & Goldberg's POS at 1, chunking at 3):
    # stage 1 and the embedding feed both tasks; stages 2-3 only feed chunking.
    torch.manual_seed(0)
    stages = [nn.Linear(EMB, HID), nn.Linear(HID, HID), nn.Linear(HID, HID)]
    emb = nn.Embedding(11, EMB)
    model = Hierarchical(
        ["pos", "chunk"], stages, [nn.Linear(HID, 5), nn.Linear(HID, 3)], {"pos": 1, "chunk": 3},
        embedding=emb,
    )  # fmt: skip
    model.check_partition()
    assert ids(model.shared_parameters()) == ids(emb.parameters()) | ids(stages[0].parameters())
    above = ids(stages[1].parameters()) | ids(stages[2].parameters())
    assert ids(model.task_parameters("chunk")) == above | ids(model.heads["chunk"].parameters())
    assert ids(model.task_parameters("pos")) == ids(model.heads["pos"].parameters())


def test_tasks_at_the_same_top_depth_share_every_stage():
    model = build(depths=(1, 3, 3))
    model.check_partition()
    assert ids(model.shared_parameters()) == ids(model.embedding.parameters()) | ids(
        model.stages.parameters()
    )
    assert model.owner is None


def test_one_task_shares_everything_but_its_head():
    torch.manual_seed(0)
    model = Hierarchical(1, [nn.Linear(3, 3), nn.Linear(3, 3)], nn.Linear(3, 1), [2])
    model.check_partition()
    assert ids(model.task_parameters("task0")) == ids(model.heads["task0"].parameters())


# ---------------------------------------------------------------------------------------
# successive regularisation (JMT section 3)


def test_successive_regularisation_term_by_hand():
    delta, delta_head = 0.5, 2.0
    model = build(sr=True, delta=delta, delta_head=delta_head)
    assert model.aux_loss() is None  # no snapshot yet
    model.snapshot("pos")
    torch.testing.assert_close(model.aux_loss(), torch.tensor(0.0))
    # Move θ_pos = (embedding, stage 1, head_pos) by known amounts, and things outside it.
    with torch.no_grad():
        model.embedding.weight.add_(0.1)  # 11 x 3 entries
        model.stages[0].linear.weight.add_(0.2)  # 4 x 3
        model.stages[0].linear.bias.sub_(0.3)  # 4
        model.heads["pos"].weight.add_(0.4)  # 5 x 4
        model.stages[1].linear.weight.add_(5.0)  # not in θ_pos
        model.heads["chunk"].bias.add_(5.0)  # not in θ_pos
    expected = delta * (33 * 0.1**2 + 12 * 0.2**2 + 4 * 0.3**2) + delta_head * 20 * 0.4**2
    torch.testing.assert_close(model.aux_loss(), torch.tensor(expected))
    # Its gradient is 2 δ (θ - θ'), pulling θ back to the snapshot.
    model.aux_loss().backward()
    torch.testing.assert_close(model.embedding.weight.grad, torch.full((11, 3), 2 * delta * 0.1))
    torch.testing.assert_close(
        model.heads["pos"].weight.grad, torch.full((5, 4), 2 * delta_head * 0.4)
    )
    assert model.stages[1].linear.weight.grad is None


def test_snapshot_of_a_middle_task_covers_the_stages_up_to_its_depth():
    model = build(sr=True, delta=1.0, delta_head=0.0)
    model.snapshot("chunk")
    with torch.no_grad():
        model.stages[1].linear.bias.add_(1.0)  # 4 entries, in θ_chunk
        model.stages[2].linear.bias.add_(1.0)  # above chunk's depth
        model.heads["chunk"].bias.add_(1.0)  # delta_head = 0
    torch.testing.assert_close(model.aux_loss(), torch.tensor(4.0))


def test_after_the_top_task_only_the_embedding_is_regularised():
    # JMT eq. 6: the bottom task, trained next (next epoch), is regularised on θ_e only,
    # towards its value after the top task's turn.
    model = build(sr=True, delta=1.0)
    model.snapshot("dep")
    with torch.no_grad():
        model.embedding.weight.add_(0.5)
        model.stages[0].linear.weight.add_(3.0)
        model.heads["dep"].weight.add_(3.0)
    torch.testing.assert_close(model.aux_loss(), torch.tensor(33 * 0.25))


def test_snapshot_replaces_the_previous_one_and_clear_drops_it():
    model = build(sr=True, delta=1.0, delta_head=1.0)
    model.snapshot("pos")
    with torch.no_grad():
        model.heads["pos"].bias.add_(1.0)
    torch.testing.assert_close(model.aux_loss(), torch.tensor(5.0))
    model.snapshot("chunk")  # head_pos no longer in scope, the moved values are the new θ'
    torch.testing.assert_close(model.aux_loss(), torch.tensor(0.0))
    model.clear_snapshot()
    assert model.aux_loss() is None


def test_snapshot_survives_a_checkpoint():
    model = build(sr=True)
    model.snapshot("chunk")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = build(sr=True)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(other.aux_loss(), model.aux_loss())


def test_successive_regularisation_off():
    model = build()
    assert model.aux_loss() is None
    assert not any("snapshots" in k for k in model.state_dict())
    with pytest.raises(PolytaskError, match="successive_regularization=True"):
        model.snapshot("pos")


def test_jmt_training_loop_runs():
    # JMT's schedule: each epoch, each task in turn bottom to top, loss + SR term, then a
    # snapshot; the term is active from the second turn on.
    model = build(shortcut="concat", sr=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = tokens()
    seen = []
    for _ in range(2):
        for t in model.order:
            opt.zero_grad()
            loss = model(x, task=t).pow(2).mean()
            aux = model.aux_loss()
            seen.append(aux is not None)
            (loss if aux is None else loss + aux).backward()
            opt.step()
            model.snapshot(t)
    assert model.order == ["pos", "chunk", "dep"]
    assert seen == [False] + [True] * 5


# ---------------------------------------------------------------------------------------
# errors and registry


@pytest.mark.parametrize(
    ("depths", "match"),
    [
        ((0, 1, 3), "depth 0 of task 'pos'"),
        ((1, 2, 4), "depth 4 of task 'dep'"),
        ((1, 2, 2), "stages 3..3 are read by no task"),
        ((1, 2), "2 entries for 3 tasks"),
        ({"pos": 1, "chunk": 2}, "one depth per task"),
    ],
)
def test_bad_depths(depths, match):
    with pytest.raises(ValueError, match=match):
        build(depths=depths)


def test_bad_arguments():
    with pytest.raises(ValueError, match="shortcut='sum'"):
        build(shortcut="sum")
    with pytest.raises(ValueError, match="delta=-1"):
        build(sr=True, delta=-1.0)
    with pytest.raises(TypeError, match="embedding must be"):
        Hierarchical(1, [nn.Linear(2, 2)], nn.Linear(2, 1), [1], embedding=torch.tanh)
    stage = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="both"):
        Hierarchical(2, [stage, nn.Linear(2, 2)], [stage, nn.Linear(2, 1)], [1, 2])


def test_created_from_the_registry():
    model = polytask.archs.create(
        "hierarchical",
        tasks=["low", "high"],
        stages=[nn.Linear(3, 3), nn.Linear(3, 3)],
        heads=nn.Linear(3, 1),
        depths=[1, 2],
    )
    assert not model.has_shared_representation
    assert set(model(torch.randn(4, 3))) == {"low", "high"}
