"""The Trainer under a two-rank process group equals the Trainer in one process."""

from __future__ import annotations

import pytest
import torch

from tests.distributed._ranks import TRAINER_CASES, launch, tiny_trainer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def test_two_ranks_train_like_one_process() -> None:
    reports = launch("trainer")
    for method, mode in TRAINER_CASES:
        case = f"{method}/{mode}"
        single = tiny_trainer(method, mode)
        result = single.fit()
        want = {n: p.detach() for n, p in single.model.named_parameters()}
        for report in reports:
            for name, value in report["params"][case].items():
                torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=case)
            for got, expected in zip(report["histories"][case], result.history):
                # Evaluation is split across the ranks and synced: the same metrics and losses.
                for key in ("val", "test"):
                    for metric, value in expected[key].items():
                        assert got[key][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                            case,
                            key,
                            metric,
                        )
                assert got["train_losses"] == pytest.approx(expected["train_losses"], rel=1e-5)
        assert torch.equal(
            reports[0]["params"][case]["encoder.0.weight"],
            reports[1]["params"][case]["encoder.0.weight"],
        )


def test_resume_under_two_ranks_is_exact_and_only_rank_zero_writes() -> None:
    reports = launch("trainer_resume")
    failures = [f for r in reports for f in r["failures"]]
    assert not failures, "\n".join(failures[:20])
