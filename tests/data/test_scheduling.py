"""Task scheduling for multi-input MTL (polytask.data.scheduling)."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from polytask.data.scheduling import MultiTaskLoader, MultiTaskStep, annealed_alpha
from polytask.errors import InvalidHyperparameterError

SIZES = {"a": 3, "b": 8, "c": 5}


def datasets(sizes=SIZES):
    # Example i of task t holds 100 * (task number) + i, so a batch says where it comes from.
    return {
        name: TensorDataset(torch.arange(n) + 100 * t) for t, (name, n) in enumerate(sizes.items())
    }


def loader(data_sizes=SIZES, batch_size=2, **kw) -> MultiTaskLoader:
    return MultiTaskLoader.from_datasets(datasets(data_sizes), batch_size=batch_size, **kw)


def close(p: torch.Tensor, expected) -> None:
    torch.testing.assert_close(p, torch.as_tensor(expected, dtype=torch.float64))


def flat(step):
    """A step as plain data: (task, example ids) or a tuple of them, for comparisons."""
    if isinstance(step, MultiTaskStep):
        return tuple((t, tuple(step.batches[t][0].tolist())) for t in step.tasks)
    task, (x,) = step
    return task, tuple(x.tolist())


def run(ml: MultiTaskLoader, epochs: int) -> list:
    return [flat(step) for _ in range(epochs) for step in ml]


# -- the samplers' probabilities -------------------------------------------------------------


def test_proportional_uniform_and_temperature_probabilities():
    sizes = {"a": 1, "b": 4, "c": 16}
    ml = loader(sizes, sampler="proportional")
    close(ml.probabilities(), torch.tensor([1, 4, 16]) / 21.0)
    ml = loader(sizes, sampler="temperature")  # T = 2: square-root sampling
    close(ml.probabilities(), torch.tensor([1, 2, 4]) / 7.0)
    ml = loader(sizes, sampler="temperature", temperature=1.0)
    close(ml.probabilities(), torch.tensor([1, 4, 16]) / 21.0)
    for sampler in ("uniform", "round_robin"):
        close(loader(sizes, sampler=sampler).probabilities(), torch.full((3,), 1 / 3.0))


def test_annealed_schedule_of_stickland_and_murray():
    # alpha = 1 - 0.8 (e - 1) / (E - 1), e = 1..E.
    assert [annealed_alpha(e, 5) for e in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert annealed_alpha(0, 1) == 1.0
    sizes = {"a": 1, "b": 9}
    ml = loader(sizes, sampler="annealed", num_epochs=3)
    close(ml.probabilities(0), torch.tensor([0.1, 0.9]))
    p = 9**0.6 / (1 + 9**0.6)
    close(ml.probabilities(1), torch.tensor([1 - p, p]))
    p = 9**0.2 / (1 + 9**0.2)
    close(ml.probabilities(2), torch.tensor([1 - p, p]))


def test_annealed_sampler_follows_the_epoch_and_stops_at_the_end_of_its_schedule():
    ml = loader({"a": 1, "b": 9}, sampler="annealed", num_epochs=2, batch_size=1)
    assert ml.probabilities()[1] == pytest.approx(0.9)
    run(ml, 1)
    assert ml.epoch == 1
    assert ml.probabilities()[1] == pytest.approx(9**0.2 / (1 + 9**0.2))
    run(ml, 1)
    with pytest.raises(InvalidHyperparameterError, match="epoch=2 is outside"):
        next(iter(ml))


def test_drawn_frequencies_match_the_probabilities():
    sizes = {"a": 1, "b": 4, "c": 16}
    ml = loader(sizes, batch_size=1, sampler="temperature", steps_per_epoch=3000)
    counts = Counter(task for task, _ in ml)
    p = ml.probabilities()
    for i, task in enumerate(sizes):
        # 4.5 standard deviations of a binomial count.
        sd = math.sqrt(3000 * p[i] * (1 - p[i]))
        assert abs(counts[task] - 3000 * p[i]) < 4.5 * sd, (task, counts, p)


def test_round_robin_cycles_through_the_tasks_across_epochs():
    ml = loader({"a": 2, "b": 2, "c": 2}, batch_size=1, sampler="round_robin", steps_per_epoch=4)
    tasks = [t for t, _ in run(ml, 2)]
    assert tasks == ["a", "b", "c", "a", "b", "c", "a", "b"]


# -- epochs ------------------------------------------------------------------------------------


def test_an_epoch_is_one_pass_worth_of_batches():
    ml = loader()  # batches per task: 2, 4, 3
    assert len(ml) == 9
    first = run(ml, 1)
    assert len(first) == 9 and ml.epoch == 1
    ml = loader(tasks_per_step=2)
    assert len(ml) == math.ceil(9 / 2) == len(run(ml, 1))


def test_round_robin_on_equal_tasks_sees_every_example_once_per_epoch():
    sizes = {"a": 4, "b": 4, "c": 4}
    ml = loader(sizes, batch_size=2, sampler="round_robin")
    for _ in range(2):
        seen = sorted(i for _, ids in run(ml, 1) for i in ids)
        assert seen == [*range(4), *range(100, 104), *range(200, 204)]


def test_each_pass_over_a_task_is_a_new_shuffle():
    ml = loader({"a": 6}, batch_size=6, sampler="uniform", steps_per_epoch=1)
    orders = [run(ml, 1)[0][1] for _ in range(4)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert len(set(orders)) > 1


# -- reproducibility -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["round_robin", "uniform", "proportional", "temperature"])
def test_same_seed_same_sequence_other_seed_other_sequence(sampler):
    assert run(loader(sampler=sampler, seed=4), 2) == run(loader(sampler=sampler, seed=4), 2)
    assert run(loader(sampler=sampler, seed=4), 2) != run(loader(sampler=sampler, seed=5), 2)


def test_a_tasks_data_order_does_not_depend_on_the_other_tasks_draws():
    def stream(sampler):
        ml = loader(sampler=sampler, seed=3, steps_per_epoch=40)
        return [ids for task, ids in run(ml, 1) if task == "b"]

    a, b = stream("round_robin"), stream("proportional")
    n = min(len(a), len(b))
    assert n >= 8 and a[:n] == b[:n]


def test_the_global_rng_is_left_alone():
    state = torch.get_rng_state()
    run(loader(sampler="uniform"), 2)
    assert torch.equal(state, torch.get_rng_state())


# -- checkpoints -------------------------------------------------------------------------------


def _resumed(make, stop_epoch: int, stop_step: int, epochs: int) -> tuple[list, list]:
    whole = run(make(), epochs)
    ml = make()
    head = run(ml, stop_epoch)
    for i, step in enumerate(ml):
        head.append(flat(step))
        if i + 1 == stop_step:
            break
    buffer = io.BytesIO()
    torch.save(ml.state_dict(), buffer)
    buffer.seek(0)
    restored = make()
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    tail = [flat(step) for step in restored]
    tail += run(restored, epochs - stop_epoch - 1)
    return whole, head + tail


@pytest.mark.parametrize(
    "kw",
    [
        {"sampler": "round_robin"},
        {"sampler": "proportional"},
        {"sampler": "temperature", "temperature": 3.0},
        {"sampler": "annealed", "num_epochs": 4},
        {"sampler": "uniform", "tasks_per_step": 2},
    ],
)
@pytest.mark.parametrize(("stop_epoch", "stop_step"), [(0, 4), (1, 3), (1, "end")])
def test_a_resumed_loader_yields_exactly_the_remaining_steps(kw, stop_epoch, stop_step):
    def make():
        return loader(seed=8, **kw)

    if stop_step == "end":  # the last step of an epoch, before the epoch is closed
        stop_step = len(make())
    whole, resumed = _resumed(make, stop_epoch, stop_step, epochs=3)
    assert resumed == whole


def test_a_checkpoint_of_another_loader_is_refused():
    state = loader(sampler="uniform").state_dict()
    with pytest.raises(ValueError, match="sampler='uniform'"):
        loader(sampler="proportional").load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(sampler="uniform", seed=1).load_state_dict(state)


# -- steps with several tasks ----------------------------------------------------------------------


def test_steps_with_several_distinct_tasks_and_their_present_mask():
    ml = loader(sampler="proportional", tasks_per_step=2, steps_per_epoch=30)
    for step in ml:
        assert isinstance(step, MultiTaskStep)
        assert len(step.tasks) == 2 and len(set(step.tasks)) == 2
        assert list(step.tasks) == sorted(step.tasks, key=list(SIZES).index)
        assert step.present.tolist() == [t in step.tasks for t in SIZES]
        for task in step.tasks:
            t = list(SIZES).index(task)
            assert all(100 * t <= i < 100 * t + SIZES[task] for i in step.batches[task][0].tolist())


def test_sequence_of_loaders_names_tasks_by_index():
    loaders = [
        DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator())
        for ds in datasets().values()
    ]
    ml = MultiTaskLoader(loaders, sampler="round_robin")
    assert ml.tasks == (0, 1, 2)
    assert [t for t, _ in run(ml, 1)][:4] == [0, 1, 2, 0]


# -- bad input -------------------------------------------------------------------------------------


def test_a_loader_without_generator_is_refused():
    ds = datasets()["a"]
    with pytest.raises(InvalidHyperparameterError, match=r"generator=torch\.Generator"):
        MultiTaskLoader({"a": DataLoader(ds, batch_size=1, shuffle=True)})
    other = torch.Generator()
    sampler = torch.utils.data.RandomSampler(ds, generator=other)
    bad = DataLoader(ds, batch_size=1, sampler=sampler, generator=torch.Generator())
    with pytest.raises(InvalidHyperparameterError, match="RandomSampler draws from another"):
        MultiTaskLoader({"a": bad})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sampler": "annealed"}, "num_epochs"),
        ({"sampler": "softmax"}, "sampler='softmax'"),
        ({"sampler": "temperature", "temperature": 0.0}, "temperature=0.0"),
        ({"tasks_per_step": 4}, "tasks_per_step=4"),
        ({"steps_per_epoch": 0}, "steps_per_epoch=0"),
        ({"sizes": [1, 2]}, "sizes="),
    ],
)
def test_bad_settings_name_themselves(kw, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        loader(**kw)


def test_explicit_sizes_drive_the_size_based_samplers():
    ml = loader(sampler="proportional", sizes=[1, 1, 2])
    close(ml.probabilities(), torch.tensor([0.25, 0.25, 0.5]))


def test_present_marks_tasks_in_the_loaders_order():
    ml = loader()
    assert ml.present("b").tolist() == [False, True, False]
    assert ml.present(["c", "a"]).tolist() == [True, False, True]
    with pytest.raises(KeyError, match="'z'"):
        ml.present(["a", "z"])


def test_the_loader_drives_a_method_through_partial_steps():
    """Each step trains one task's head and the shared encoder through a partial step."""
    import polytask

    torch.manual_seed(0)
    encoder = torch.nn.Linear(1, 3)
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(3, 1) for name in SIZES})
    ml = loader(sampler="round_robin", steps_per_epoch=3)
    method = polytask.methods.create("mgda", 3)
    for task, (x,) in ml:
        encoder.zero_grad()
        heads.zero_grad()
        out = heads[task](encoder(x.float().unsqueeze(1)))
        loss = (out**2).mean()
        losses = torch.stack([loss if t == task else loss.new_zeros(()) for t in ml.tasks])
        result = method.backward(
            losses, shared_params=list(encoder.parameters()), present=ml.present(task)
        )
        # One present task: MGDA on it alone is its own gradient, with weight 1.
        assert result.weights.tolist() == [float(t == task) for t in ml.tasks]
        (expected,) = torch.autograd.grad(
            (heads[task](encoder(x.float().unsqueeze(1))) ** 2).mean(), [encoder.weight]
        )
        torch.testing.assert_close(encoder.weight.grad, expected)
        assert all(
            p.grad is None for name in SIZES if name != task for p in heads[name].parameters()
        )
