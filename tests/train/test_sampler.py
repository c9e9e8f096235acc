"""ResumableBatchSampler: the ranks' parts of each global batch concatenate to the
single-process batch; resumable mid-epoch."""

from __future__ import annotations

import pytest

from polytask.train.sampler import ResumableBatchSampler


def _epoch(n: int, batch: int, world: int, rank: int, **kw) -> list[list[int]]:
    return list(ResumableBatchSampler(n, batch, seed=5, rank=rank, world_size=world, **kw))


@pytest.mark.parametrize("n,batch,world", [(30, 7, 2), (31, 8, 3), (10, 4, 4), (9, 9, 2)])
def test_ranks_concatenate_to_the_single_process_batches(n, batch, world) -> None:
    single = _epoch(n, batch, 1, 0)
    parts = [_epoch(n, batch, world, r) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
    kept = [b for b in single if len(b) >= world]  # a last batch smaller than R is dropped
    assert [[j for p in parts for j in p[i]] for i in range(len(kept))] == kept
    for i in range(len(kept)):
        sizes = [len(p[i]) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_last_batch_smaller_than_the_world_is_dropped_and_no_sample_repeats() -> None:
    # 10 samples, batch 4, 3 ranks: batches 4, 4, 2; the 2 cannot feed 3 ranks.
    parts = [_epoch(10, 4, 3, r) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2]
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) == 8


def test_drop_last_drops_the_incomplete_global_batch() -> None:
    parts = [_epoch(30, 7, 2, r, drop_last=True) for r in range(2)]
    assert [len(p) for p in parts] == [4, 4]
    assert all(len(a) + len(b) == 7 for a, b in zip(*parts))


def test_resume_mid_epoch_continues_the_same_order() -> None:
    whole = ResumableBatchSampler(30, 7, seed=1, rank=1, world_size=2)
    expected = list(whole)
    cut = ResumableBatchSampler(30, 7, seed=1, rank=1, world_size=2)
    it = iter(cut)
    first = [next(it), next(it)]
    state = cut.state_dict()
    resumed = ResumableBatchSampler(30, 7, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert first + list(resumed) == expected


def test_bad_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="rank=2"):
        ResumableBatchSampler(10, 2, rank=2, world_size=2)
