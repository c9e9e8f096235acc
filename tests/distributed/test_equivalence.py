"""Distributed balancing equals the single-process step on the concatenated batch.

Two gloo ranks in float64 hold 4 and 3 of 7 samples; the reference runs the same method in
one process on all 7 (rank order). Compared after each step: the weights, the ``.grad`` of
every shared and task-specific parameter (including one read by two tasks) and of the
method's own parameters, the parameters after SGD/Adam steps, and the method's state.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed._ranks import K, launch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _check(reports) -> None:
    failures = [f for r in reports for f in r["failures"]]
    tags = sorted({f.split(" step")[0].split(" state")[0] for f in failures})
    assert not failures, "\n".join(tags + failures[:10])
    first = reports[0]["params"]
    for other in reports[1:]:
        for case, params in first.items():
            for name, value in params.items():
                assert torch.equal(value, other["params"][case][name]), (case, name)


def test_every_method_both_modes_one_step() -> None:
    _check(launch("every_method"))


def test_every_method_with_ddp_reducing() -> None:
    _check(launch("with_ddp"))


def test_features_mode_and_loss_weightings_with_fsdp_reducing() -> None:
    _check(launch("with_fsdp"))


def test_stateful_and_random_methods_three_sgd_and_adam_steps() -> None:
    _check(launch("several_steps"))


def test_sharded_params_mode_for_every_gramian_method() -> None:
    reports = launch("sharded")
    assert len(reports[0]["methods"]) >= 8  # mgda, cagrad, nash_mtl, upgrad, ...
    _check(reports)


def test_group_of_one_rank_equals_no_distribution() -> None:
    _check(launch("world_of_one"))


def test_uneven_shards_without_counts_differ() -> None:
    # The check above can fail: counting the ranks equally (DDP's convention) is not the
    # concatenated batch when the shards are 4 and 3 samples.
    reports = launch("uncounted")
    assert any("grads" in d for d in reports[0]["differences"])


def test_communication_payload_is_the_documented_one() -> None:
    logs = launch("payloads")[0]["payloads"]
    p = 5 * 4 + 4 + 4 * 3 + 3  # encoder parameters
    # The task-specific parameters (heads and `joint`: 8 tensors, 16 entries): a reached flag
    # per tensor and one row of 16 per task.
    h = 8 + K * (K * (3 + 1) + 3 + 1)
    # Every parameter of the model, after one reached-flag per parameter tensor (12).
    model = 12 + p + K * 4 + 4
    assert logs["mgda/params/plain/full"] == [
        ("all_reduce", 2 * K + h + K * p),
        ("broadcast", K),
    ]
    padded = -(-p // 2) * 2
    assert logs["mgda/params/plain/sharded"] == [
        ("reduce_scatter", K * padded),
        ("all_reduce", 2 * K + h + K * K),
        ("broadcast", K),
        ("all_gather", padded // 2),
    ]
    assert logs["pcgrad/params/plain/auto"] == [("all_reduce", 2 * K + h + K * p)]
    # Features mode: K x K with DDP reducing; a plain module adds one all-reduce of the step's
    # gradients.
    # The first step that DDP reduces adds the one-time check that it did (4 numbers).
    check = ("all_reduce", 4)
    assert logs["mgda/features/ddp/auto"] == [
        ("all_reduce", 2 * K + K * K),
        ("broadcast", K),
        check,
    ]
    assert logs["mgda/features/plain/auto"] == [
        ("all_reduce", 2 * K + K * K),
        ("broadcast", K),
        ("all_reduce", model),
    ]
    width = 4 * 3  # the widest rank's features: 4 samples x 3
    assert logs["pcgrad/features/ddp/auto"] == [
        ("all_gather", 1),
        ("all_gather", 2 * K + (K + 1) * width),
        check,
    ]
    assert logs["uw/params/ddp/auto"] == [("all_reduce", 2 * K), check]
    assert logs["uw/params/plain/auto"] == [("all_reduce", 2 * K), ("all_reduce", model)]


def test_misuse_raises_and_says_what_to_do() -> None:
    messages = launch("misuse")[0]["messages"]
    assert "distribute(method, model)" in messages["undecided"]
    assert (
        "forward pass and method.backward inside one `with model.no_sync():`"
        in (messages["ddp_params_synced"])
    )
    assert "find_unused_parameters=True" in messages["find_unused_parameters"]
    assert "static_graph=True" in messages["static_graph"]
    assert "partial_tasks=True" in messages["partial"]
    assert "did not go through the DDP module" in messages["ddp_bypassed"]
    assert "use mode='features' with FSDP" in messages["fsdp_params"]


def test_a_task_parameter_only_some_ranks_reach() -> None:
    _check(launch("routed"))


def test_parameters_outside_ddp_are_reduced() -> None:
    _check(launch("outside_ddp"))


def test_fp16_overflow_under_ddp_skips_and_the_next_step_runs() -> None:
    _check(launch("ddp_overflow"))


def test_meta_steps_of_auto_lambda_moml_and_sequential_reptile() -> None:
    _check(launch("meta"))


def test_rotograd_with_the_heads_on_rotated_features() -> None:
    _check(launch("rotograd"))


def test_sdmgrad_double_sampling_jacobians_are_reduced() -> None:
    _check(launch("sdmgrad_double_sampling"))


def test_ranks_holding_different_tasks() -> None:
    _check(launch("partial"))
