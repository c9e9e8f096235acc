"""What each rank runs in the distributed tests (spawned with gloo, float64).

Every scenario writes ``{"failures": [...], "params": {...}}`` to ``OUT/rank<r>.pt``; the
test asserts no failures and the same parameters on every rank. The single-process
reference runs inside each rank on the concatenated batch (rank order), with the method
marked ``local``.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import polytask
from polytask.distributed import distribute, local
from polytask.methods.context import CONTEXT
from polytask.train.launch import exit_worker

K = 3
#: Rank r holds these rows of the global batch (uneven on purpose).
SHARDS = {1: [range(0, 7)], 2: [range(0, 4), range(4, 7)]}
TOL = dict(rtol=1e-9, atol=1e-11)


class Net(nn.Module):
    """Encoder, one head per task, and a layer that tasks 0 and 1 both read (a task
    parameter with two owners)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(K))
        self.joint = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        outs = [h(z) + (self.joint(z) if k < 2 else 0) for k, h in enumerate(self.heads)]
        return z, outs


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 5, generator=g), torch.randn(7, K, generator=g)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int = 2) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` gloo ranks; return each rank's report."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, free_port(), out, scenario), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, port: int, out: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), POLYTASK_TEST_OUT=out)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = SCENARIOS[scenario](rank, world)
    except Exception as error:  # the test prints it instead of a hung peer
        import traceback

        report = {"failures": [f"rank {rank} crashed: {traceback.format_exc()}"], "params": {}}
        torch.save(report, Path(out) / f"rank{rank}.pt")
        raise error
    torch.save(report, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    exit_worker(0)  # gloo's threads may outlive the group: no interpreter shutdown (see there)


# -- helpers ----------------------------------------------------------------------------------
def context_for(method: type) -> dict[str, Any]:
    return {key: CONTEXT[key].example(K) for key in method.needs}


def step(model, method, x, y, mode: str, ctx: dict[str, Any], n: int | None):
    z, outs = model(x)
    losses = torch.stack([((o.squeeze(-1) - y[:, k]) ** 2).mean() for k, o in enumerate(outs)])
    enc = (
        model.module.encoder
        if isinstance(model, nn.parallel.DistributedDataParallel)
        else (model.encoder)
    )
    extra = {} if n is None else {"num_samples": n}
    return method.backward(
        losses,
        shared_params=list(enc.parameters()),
        features=z if mode == "features" else None,
        mode=mode,
        **ctx,
        **extra,
    ), losses


def after(model, method, x, y, n: int | None) -> None:
    if type(method).needs_losses_after_step:
        with torch.no_grad():
            _, outs = model(x)
            losses = torch.stack(
                [((o.squeeze(-1) - y[:, k]) ** 2).mean() for k, o in enumerate(outs)]
            )
        method.after_step(losses, num_samples=n)


def compare(tag: str, a: Any, b: Any, failures: list[str]) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if a is None or b is None or not isinstance(a, torch.Tensor):
            failures.append(f"{tag}: {a!r} vs {b!r}")
        elif a.dtype == torch.uint8 or a.dtype == torch.bool:
            if not torch.equal(a, b):
                failures.append(f"{tag}: differ")
        elif a.shape != b.shape or not torch.allclose(a, b.to(a), **TOL):
            failures.append(f"{tag}: {a.flatten()[:6].tolist()} vs {b.flatten()[:6].tolist()}")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            failures.append(f"{tag}: keys {sorted(a)} vs {sorted(b)}")
        for key in a:
            if key in b:
                compare(f"{tag}.{key}", a[key], b[key], failures)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b)):
            compare(f"{tag}[{i}]", u, v, failures)
    elif isinstance(a, float) and isinstance(b, float):
        if abs(a - b) > 1e-9 * max(1.0, abs(a)):
            failures.append(f"{tag}: {a} vs {b}")
    elif a != b:
        failures.append(f"{tag}: {a!r} vs {b!r}")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of an FSDP-sharded one (DTensor), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        n: None if p.grad is None else _full(p.grad).clone() for n, p in inner.named_parameters()
    }


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {n: _full(p.detach()).clone() for n, p in inner.named_parameters()}


def equivalence(
    rank: int,
    world: int,
    name: str,
    mode: str,
    *,
    wrap: str = "plain",
    steps: int = 1,
    optimizer: str = "sgd",
    group: Any = None,
    failures: list[str],
    sync_kwargs: dict[str, Any] | None = None,
    count: bool = True,
    hparams: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """``steps`` steps of ``name`` on this rank's shard vs the reference on the whole batch."""
    cls = polytask.methods.get(name)
    ctx = context_for(cls)
    x, y = data()
    rows = list(SHARDS[world][rank]) if group is None else list(range(7))
    torch.manual_seed(0)
    reference = Net()
    torch.manual_seed(1000 + rank)  # ranks start from different weights: distribute syncs them
    model = Net()
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = copy.deepcopy(reference)
        fully_shard(model)
    hparams = hparams or {}
    ref_method = local(polytask.methods.create(name, K, seed=0, **hparams))
    source = dist.get_rank(group) == 0
    # Other ranks start from other seeds: distribute copies the source rank's state.
    method = polytask.methods.create(name, K, seed=0 if source else 1000 + rank, **hparams)
    if wrap == "plain" and source:
        model.load_state_dict(reference.state_dict())
    distribute(method, model, group=group, **(sync_kwargs or {}))
    tag = f"{name}/{mode}/{wrap}"

    def make_opt(m: nn.Module):
        return (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(
            list(m.parameters())
            + list(ref_method.parameters() if m is reference else method.parameters()),
            lr=0.05,
        )

    opt_ref, opt = make_opt(reference), make_opt(model)
    n = len(rows) if count else None
    for i in range(steps):
        opt_ref.zero_grad()
        opt.zero_grad()
        res_ref, _ = step(reference, ref_method, x, y, mode, ctx, None)
        if wrap == "ddp" and mode == "params" and cls.family != "loss":
            with model.no_sync():
                res, _ = step(model, method, x[rows], y[rows], mode, ctx, n)
        else:
            res, _ = step(model, method, x[rows], y[rows], mode, ctx, n)
        compare(f"{tag} step {i} weights", res_ref.weights, res.weights, failures)
        compare(f"{tag} step {i} gramian", res_ref.gramian, res.gramian, failures)
        compare(f"{tag} step {i} grads", grads(reference), grads(model), failures)
        compare(
            f"{tag} step {i} method grads",
            grads(ref_method),
            grads(method),
            failures,
        )
        opt_ref.step()
        opt.step()
        after(reference, ref_method, x, y, None)
        after(model, method, x[rows], y[rows], n)
        compare(f"{tag} step {i} params", params(reference), params(model), failures)
    compare(f"{tag} state", ref_method.state_dict(), method.state_dict(), failures)
    return params(model), method


# -- scenarios --------------------------------------------------------------------------------
def _distributable() -> list[str]:
    out = []
    for name in polytask.methods.available():
        cls = polytask.methods.get(name)
        meta_ok = not cls.needs_meta_step or getattr(cls, "meta_step_distributed", False)
        if cls.distributable and meta_ok:
            out.append(name)
    return out


def every_method(rank: int, world: int) -> dict[str, Any]:
    failures: list[str] = []
    finals = {}
    for name in _distributable():
        for mode in sorted(polytask.methods.get(name).modes):
            finals[f"{name}/{mode}"], _ = equivalence(rank, world, name, mode, failures=failures)
    return {"failures": failures, "params": finals}


def with_ddp(rank: int, world: int) -> dict[str, Any]:
    """DDP's own all-reduce in features mode and for loss weightings; params mode under
    ``no_sync()``."""
    failures: list[str] = []
    finals = {}
    for name in _distributable():
        for mode in sorted(polytask.methods.get(name).modes):
            finals[f"{name}/{mode}"], _ = equivalence(
                rank, world, name, mode, wrap="ddp", failures=failures
            )
    return {"failures": failures, "params": finals}


def with_fsdp(rank: int, world: int) -> dict[str, Any]:
    """FSDP (fully_shard) reducing: features mode, and the loss weightings."""
    failures: list[str] = []
    finals = {}
    for name in _distributable():
        cls = polytask.methods.get(name)
        modes = ["features"] if "features" in cls.modes else []
        if cls.family == "loss":
            modes.append("params")
        for mode in modes:
            finals[f"{name}/{mode}"], _ = equivalence(
                rank, world, name, mode, wrap="fsdp", steps=2, failures=failures
            )
    return {"failures": failures, "params": finals}


#: Methods run for several steps: state carried between steps, randomness, learnable weights.
SEVERAL = [
    "famo",
    "uw",
    "dwa",
    "rlw",
    "nash_mtl",
    "pcgrad",
    "gradvac",
    "mgda",
    "imtl_l",
    "moco",
    "db_mtl",
    "aligned_mtl",
]


def several_steps(rank: int, world: int) -> dict[str, Any]:
    failures: list[str] = []
    finals = {}
    # Nash-MTL solving every other step: the steps between reuse the weights (clipped by the
    # global update's norm).
    for mode in ("params", "features"):
        for wrap in ("plain", "ddp"):
            finals[f"nash_mtl/every2/{mode}/{wrap}"], _ = equivalence(
                rank,
                world,
                "nash_mtl",
                mode,
                wrap=wrap,
                steps=4,
                failures=failures,
                hparams={"update_weights_every": 2},
            )
    for optimizer in ("sgd", "adam"):
        for name in SEVERAL:
            for mode in sorted(polytask.methods.get(name).modes):
                finals[f"{name}/{mode}/{optimizer}"], _ = equivalence(
                    rank, world, name, mode, steps=3, optimizer=optimizer, failures=failures
                )
    return {"failures": failures, "params": finals}


def _plain_gramian() -> list[str]:
    from polytask.methods.base import GramianMethod

    return [
        name
        for name in _distributable()
        if issubclass(polytask.methods.get(name), GramianMethod)
        and polytask.methods.get(name)._aggregate is GramianMethod._aggregate
    ]


def sharded(rank: int, world: int) -> dict[str, Any]:
    failures: list[str] = []
    finals = {}
    for name in _plain_gramian():
        finals[name], _ = equivalence(
            rank,
            world,
            name,
            "params",
            steps=2,
            failures=failures,
            sync_kwargs={"params_strategy": "sharded"},
        )
    return {"failures": failures, "params": finals, "methods": _plain_gramian()}


def world_of_one(rank: int, world: int) -> dict[str, Any]:
    """A group of one rank equals no distribution at all."""
    groups = [dist.new_group([r]) for r in range(world)]
    failures: list[str] = []
    for name in _distributable():
        for mode in sorted(polytask.methods.get(name).modes):
            equivalence(rank, world, name, mode, group=groups[rank], failures=failures)
    return {"failures": failures, "params": {}}


def uncounted(rank: int, world: int) -> dict[str, Any]:
    """Without ``num_samples`` uneven shards count equally: not the concatenated batch."""
    failures: list[str] = []
    equivalence(rank, world, "ew", "params", failures=failures, count=False)
    return {"failures": [], "params": {}, "differences": failures}


def payloads(rank: int, world: int) -> dict[str, Any]:
    """The collectives of one step of each kind, as logged by the communicator."""
    x, y = data()
    rows = list(SHARDS[world][rank])
    out: dict[str, Any] = {}
    cases = [
        ("mgda", "params", "plain", {"params_strategy": "full"}),
        ("mgda", "params", "plain", {"params_strategy": "sharded"}),
        ("pcgrad", "params", "plain", {}),
        ("mgda", "features", "plain", {}),
        ("mgda", "features", "ddp", {}),
        ("pcgrad", "features", "ddp", {}),
        ("uw", "params", "plain", {}),
        ("uw", "params", "ddp", {}),
    ]
    for name, mode, wrap, kwargs in cases:
        torch.manual_seed(0)
        model = Net()
        if wrap == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        method = distribute(polytask.methods.create(name, K, seed=0), model, **kwargs)
        ctx = context_for(type(method))
        if wrap == "ddp" and mode == "params" and method.family != "loss":
            with model.no_sync():
                step(model, method, x[rows], y[rows], mode, ctx, len(rows))
        else:
            step(model, method, x[rows], y[rows], mode, ctx, len(rows))
        out[f"{name}/{mode}/{wrap}/{kwargs.get('params_strategy', 'auto')}"] = list(
            method.sync.comm.log
        )
    return {"failures": [], "params": {}, "payloads": out}


def misuse(rank: int, world: int) -> dict[str, Any]:
    """Each wrong way is a DistributedError that says what to do."""
    from polytask.errors import DistributedError, InvalidContextError

    x, y = data()
    rows = list(SHARDS[world][rank])
    messages: dict[str, str] = {}

    def expect(tag: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except DistributedError as error:
            messages[tag] = str(error)
        except InvalidContextError as error:  # the same error as on one process
            messages[tag] = str(error)
        else:
            messages[tag] = "NO ERROR"

    torch.manual_seed(0)
    plain = Net()
    undecided = polytask.methods.create("pcgrad", K)
    expect("undecided", lambda: step(plain, undecided, x[rows], y[rows], "params", {}, None))
    ddp = nn.parallel.DistributedDataParallel(Net())
    method = distribute(polytask.methods.create("pcgrad", K, seed=0), ddp)
    expect("ddp_params_synced", lambda: step(ddp, method, x[rows], y[rows], "params", {}, 4))
    # Features mode through DDP, but the forward bypasses the DDP module: DDP reduces nothing.
    bypassed = nn.parallel.DistributedDataParallel(Net())
    features_method = distribute(polytask.methods.create("mgda", K), bypassed)
    expect(
        "ddp_bypassed",
        lambda: step(bypassed.module, features_method, x[rows], y[rows], "features", {}, 4),
    )
    from torch.distributed.fsdp import fully_shard

    sharded_model = Net()
    fully_shard(sharded_model)
    fsdp_method = distribute(polytask.methods.create("pcgrad", K), sharded_model)
    expect(
        "fsdp_params",
        lambda: step(sharded_model, fsdp_method, x[rows], y[rows], "params", {}, 4),
    )
    for flag in ("find_unused_parameters", "static_graph"):
        flagged = nn.parallel.DistributedDataParallel(Net(), **{flag: True})
        flagged_method = distribute(polytask.methods.create("mgda", K), flagged)
        expect(
            flag,
            lambda m=flagged, f=flagged_method: step(m, f, x[rows], y[rows], "features", {}, 4),
        )
    # Task 1 is in no rank's batch, and UW has no partial steps.
    partial = distribute(polytask.methods.create("uw", K), plain)
    present = torch.tensor([True, False, True])
    _, outs = plain(x[rows])
    losses = torch.stack([((o.squeeze(-1) - y[rows, k]) ** 2).mean() for k, o in enumerate(outs)])
    expect(
        "partial",
        lambda: partial.backward(
            losses, shared_params=list(plain.encoder.parameters()), present=present
        ),
    )
    # Balancing each rank on its own is allowed when chosen.
    chosen = local(polytask.methods.create("pcgrad", K))
    step(plain, chosen, x[rows], y[rows], "params", {}, None)
    return {"failures": [], "params": {}, "messages": messages}


class RoutedNet(Net):
    """Net plus a head layer that only samples with x[:, 0] > 1 reach (data-dependent
    routing): in the tests only rank 0's batch holds such samples."""

    def __init__(self) -> None:
        super().__init__()
        self.rare = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, outs = super().forward(x)
        routed = x[:, 0] > 1
        if bool(routed.any()):
            extra = torch.zeros_like(outs[1])
            extra[routed] = self.rare(z[routed])
            outs[1] = outs[1] + extra
        return z, outs


def routed(rank: int, world: int) -> dict[str, Any]:
    """A task parameter reached by one rank's batch only (the other's graph lacks it): the
    ranks' buffers still line up, and the step equals one process's."""
    failures: list[str] = []
    x, y = data()
    x[:, 0] = -2.0
    x[1, 0] = 2.0  # sample 1, on rank 0, is routed
    rows = list(SHARDS[world][rank])
    finals = {}
    for name, mode in [
        ("mgda", "params"),
        ("pcgrad", "params"),
        ("ew", "params"),
        ("mgda", "features"),
        ("pcgrad", "features"),
    ]:
        torch.manual_seed(0)
        reference = RoutedNet()
        model = copy.deepcopy(reference)
        ref_method = local(polytask.methods.create(name, K, seed=0))
        method = distribute(polytask.methods.create(name, K, seed=0), model)
        ctx = context_for(type(method))
        res_ref, _ = step(reference, ref_method, x, y, mode, ctx, None)
        res, _ = step(model, method, x[rows], y[rows], mode, ctx, len(rows))
        tag = f"routed {name}/{mode}"
        compare(f"{tag} weights", res_ref.weights, res.weights, failures)
        compare(f"{tag} grads", grads(reference), grads(model), failures)
        finals[f"{name}/{mode}"] = grads(model)
    return {
        "failures": failures,
        "params": {k: {n: g for n, g in v.items() if g is not None} for k, v in finals.items()},
    }


def outside_ddp(rank: int, world: int) -> dict[str, Any]:
    """A learnable parameter in the losses but outside the DDP module (a temperature per
    task) is reduced by polytask: its gradient equals one process's on every rank."""
    failures: list[str] = []
    x, y = data()
    rows = list(SHARDS[world][rank])
    for name, mode in [
        ("ew", "params"),
        ("uw", "params"),
        ("mgda", "features"),
        ("pcgrad", "features"),
    ]:
        torch.manual_seed(0)
        reference = Net()
        temp_ref = nn.Parameter(torch.tensor([0.5, 1.5, 1.0]))
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
        temp = nn.Parameter(temp_ref.detach().clone())
        ref_method = local(polytask.methods.create(name, K, seed=0))
        method = distribute(polytask.methods.create(name, K, seed=0), model)

        def run(net, m, t, xs, ys, n, mode=mode):
            z, outs = net(xs)
            losses = torch.stack(
                [t[k] * ((o.squeeze(-1) - ys[:, k]) ** 2).mean() for k, o in enumerate(outs)]
            )
            enc = net.module.encoder if hasattr(net, "module") else net.encoder
            extra = {} if n is None else {"num_samples": n}
            m.backward(
                losses,
                shared_params=list(enc.parameters()),
                features=z if mode == "features" else None,
                mode=mode,
                **extra,
            )

        run(reference, ref_method, temp_ref, x, y, None)
        run(model, method, temp, x[rows], y[rows], len(rows))
        tag = f"outside {name}/{mode}"
        compare(f"{tag} temperature grad", temp_ref.grad, temp.grad, failures)
        compare(f"{tag} grads", grads(reference), grads(model), failures)
    return {"failures": failures, "params": {}}


def ddp_overflow(rank: int, world: int) -> dict[str, Any]:
    """fp16 loss scaling under DDP in features mode: an overflowed step leaves NaN for the
    scaler in every parameter DDP waits for, so the next step runs."""
    torch.set_default_dtype(torch.float32)
    failures: list[str] = []
    x, y = data()
    x, y = x.float(), y.float()
    rows = list(SHARDS[world][rank])
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net().float())
    method = distribute(polytask.methods.create("mgda", K), model)
    for i, scale in enumerate([2.0**120, 1.0]):
        model.zero_grad()
        z, outs = model(x[rows])
        losses = torch.stack(
            [scale * ((o.squeeze(-1) - y[rows, k]) ** 2).mean() for k, o in enumerate(outs)]
        )
        result = method.backward(
            losses,
            shared_params=list(model.module.encoder.parameters()),
            features=z,
            mode="features",
            loss_scale=scale,
            num_samples=len(rows),
        )
        overflowed = bool(result.extras.get("found_inf"))
        if overflowed != (i == 0):
            failures.append(f"step {i}: found_inf={overflowed}")
        if i == 0 and any(
            p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters()
        ):
            failures.append("an overflowed step must leave NaN in every parameter's grad")
    return {"failures": failures, "params": {}}


def meta(rank: int, world: int) -> dict[str, Any]:
    """Auto-Lambda's and MOML's meta step (look-ahead on a validation batch) on each rank's
    shares of the training and validation batches = the meta step on the whole batches."""
    failures: list[str] = []
    x, y = data()
    g = torch.Generator().manual_seed(9)
    xv, yv = torch.randn(7, 5, generator=g), torch.randn(7, K, generator=g)
    rows = list(SHARDS[world][rank])

    def loss_fn(model, batch):
        xs, ys = batch
        _, outs = model(xs)
        return torch.stack([((o.squeeze(-1) - ys[:, k]) ** 2).mean() for k, o in enumerate(outs)])

    for name in ("auto_lambda", "moml"):
        for hessian in ("finite_difference", "exact"):
            torch.manual_seed(0)
            reference = Net()
            model = copy.deepcopy(reference)
            ref_method = local(polytask.methods.create(name, K, hessian=hessian, meta_lr=0.1))
            method = distribute(
                polytask.methods.create(name, K, hessian=hessian, meta_lr=0.1), model
            )
            tag = f"meta {name}/{hessian}"
            for i in range(2):
                got_ref = ref_method.meta_step(reference, (x, y), (xv, yv), loss_fn, inner_lr=0.1)
                got = method.meta_step(
                    model,
                    (x[rows], y[rows]),
                    (xv[rows], yv[rows]),
                    loss_fn,
                    inner_lr=0.1,
                    num_samples=(len(rows), len(rows)),
                )
                compare(f"{tag} step {i} weights", got_ref.weights, got.weights, failures)
                compare(f"{tag} step {i} val losses", got_ref.val_losses, got.val_losses, failures)
                compare(
                    f"{tag} step {i} meta gradient",
                    got_ref.meta_gradient,
                    got.meta_gradient,
                    failures,
                )
            compare(f"{tag} state", ref_method.state_dict(), method.state_dict(), failures)
            res_ref, _ = step(reference, ref_method, x, y, "params", {}, None)
            res, _ = step(model, method, x[rows], y[rows], "params", {}, len(rows))
            compare(f"{tag} backward weights", res_ref.weights, res.weights, failures)
            compare(f"{tag} backward grads", grads(reference), grads(model), failures)
    # Sequential Reptile: three inner steps (task order from the synchronised generator),
    # with the model's SGD (momentum) and with a plain inner learning rate.
    batches = [(x, y), (xv, yv), (x.flip(0), y.flip(0))]
    for use_optimizer in (True, False):
        torch.manual_seed(0)
        reference = Net()
        model = copy.deepcopy(reference)
        ref_method = local(polytask.methods.create("sequential_reptile", K, seed=0))
        method = distribute(polytask.methods.create("sequential_reptile", K, seed=0), model)
        inner = {}
        if use_optimizer:
            ref_inner = {
                "inner_optimizer": torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
            }
            inner = {"inner_optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}
        else:
            ref_inner = inner = {"inner_lr": 0.1}
        for i in range(2):
            got_ref = ref_method.meta_step(reference, batches, None, loss_fn, **ref_inner)
            got = method.meta_step(
                model,
                [(bx[rows], by[rows]) for bx, by in batches],
                None,
                loss_fn,
                num_samples=[len(rows)] * 3,
                **inner,
            )
            tag = f"sequential_reptile optimizer={use_optimizer} step {i}"
            compare(f"{tag} tasks", got_ref.extras["tasks"], got.extras["tasks"], failures)
            compare(f"{tag} params", params(reference), params(model), failures)
    return {"failures": failures, "params": {}}


def rotograd(rank: int, world: int) -> dict[str, Any]:
    """RotoGrad with the heads reading the rotated representation: its rotation objective
    and magnitude rule see the global feature Jacobian, so rotations, model and state equal
    one process's over three Adam steps."""
    failures: list[str] = []
    x, y = data()
    rows = list(SHARDS[world][rank])

    def run(net, method, xs, ys, n):
        z = net.encoder(xs)
        zs = method.rotate(z)
        outs = [h(zk) for h, zk in zip(net.heads, zs)]
        losses = torch.stack([((o.squeeze(-1) - ys[:, k]) ** 2).mean() for k, o in enumerate(outs)])
        extra = {} if n is None else {"num_samples": n}
        return method.backward(
            losses,
            shared_params=list(net.encoder.parameters()),
            features=z,
            mode="features",
            **extra,
        )

    torch.manual_seed(0)
    reference = Net()
    model = copy.deepcopy(reference)
    ref_method = local(polytask.methods.create("rotograd", K, latent_size=3, burn_in_period=1))
    method = distribute(
        polytask.methods.create("rotograd", K, latent_size=3, burn_in_period=1), model
    )
    opts = [
        torch.optim.Adam([*m.parameters(), *r.parameters()], lr=0.05)
        for m, r in ((reference, ref_method), (model, method))
    ]
    for i in range(3):
        for opt in opts:
            opt.zero_grad()
        run(reference, ref_method, x, y, None)
        run(model, method, x[rows], y[rows], len(rows))
        compare(f"rotograd step {i} grads", grads(reference), grads(model), failures)
        compare(
            f"rotograd step {i} rotation grads",
            grads(ref_method),
            grads(method),
            failures,
        )
        for opt in opts:
            opt.step()
    compare("rotograd state", ref_method.state_dict(), method.state_dict(), failures)
    return {"failures": failures, "params": {"rotograd": params(model)}}


def sdmgrad_double_sampling(rank: int, world: int) -> dict[str, Any]:
    """SDMGrad's xi_jacobians (Jacobians of two extra batches), each rank's shares reduced."""
    failures: list[str] = []
    x, y = data()
    rows = list(SHARDS[world][rank])
    g = torch.Generator().manual_seed(4)
    extra = [(torch.randn(7, 5, generator=g), torch.randn(7, K, generator=g)) for _ in range(2)]

    def jac(net, xs, ys):
        _, outs = net(xs)
        losses = torch.stack([((o.squeeze(-1) - ys[:, k]) ** 2).mean() for k, o in enumerate(outs)])
        return polytask.autograd.jacobian(losses, list(net.encoder.parameters()))

    torch.manual_seed(0)
    reference = Net()
    model = copy.deepcopy(reference)
    ref_method = local(polytask.methods.create("sdmgrad", K, seed=0))
    method = distribute(polytask.methods.create("sdmgrad", K, seed=0), model)
    for i in range(2):
        ref_xi = tuple(jac(reference, bx, by) for bx, by in extra)
        xi = tuple(jac(model, bx[rows], by[rows]) for bx, by in extra)
        res_ref, _ = step(reference, ref_method, x, y, "params", {"xi_jacobians": ref_xi}, None)
        res, _ = step(model, method, x[rows], y[rows], "params", {"xi_jacobians": xi}, len(rows))
        compare(f"sdmgrad xi step {i} weights", res_ref.weights, res.weights, failures)
        compare(f"sdmgrad xi step {i} grads", grads(reference), grads(model), failures)
    return {"failures": failures, "params": {}}


def partial(rank: int, world: int) -> dict[str, Any]:
    """The ranks' batches hold different tasks (multi-input MTL, missing labels): rank 0's
    samples carry tasks 0 and 1, rank 1's tasks 1 and 2 (then only 1). Each task's loss and
    gradients are counted over the ranks that hold it; the step equals one process on the
    whole batch (every method when every task is on some rank; the methods with partial
    steps when task 2 is on none)."""
    failures: list[str] = []
    x, y = data()
    rows = list(SHARDS[world][rank])

    def masked_losses(outs, ys, mask):
        terms = []
        for k, o in enumerate(outs):
            if bool(mask[:, k].any()):
                err = (o.squeeze(-1) - ys[:, k]) ** 2
                terms.append(err[mask[:, k]].mean())
            else:
                # A constant placeholder, as a multi-input loop has for a task without data
                # in its batch: never read.
                terms.append(torch.tensor(float("nan"), dtype=o.dtype))
        return torch.stack(terms)

    for case, tasks_of_rank1 in (("all tasks somewhere", [1, 2]), ("task 2 nowhere", [1])):
        mask = torch.zeros(7, K, dtype=torch.bool)
        mask[:4, [0, 1]] = True
        mask[4:, tasks_of_rank1] = True
        everywhere = bool(mask.any(0).all())
        for name in _distributable():
            cls = polytask.methods.get(name)
            if cls.needs_meta_step or (not everywhere and not cls.partial_tasks):
                continue
            for mode in sorted(cls.modes):
                torch.manual_seed(0)
                reference = Net()
                model = copy.deepcopy(reference)
                ref_method = local(polytask.methods.create(name, K, seed=0))
                method = distribute(polytask.methods.create(name, K, seed=0), model)
                ctx = context_for(cls)
                z, outs = reference(x)
                ref_ctx = dict(ctx) if everywhere else {**ctx, "present": mask.any(0)}
                res_ref = ref_method.backward(
                    masked_losses(outs, y, mask),
                    shared_params=list(reference.encoder.parameters()),
                    features=z if mode == "features" else None,
                    mode=mode,
                    **ref_ctx,
                )
                z, outs = model(x[rows])
                res = method.backward(
                    masked_losses(outs, y[rows], mask[rows]),
                    shared_params=list(model.encoder.parameters()),
                    features=z if mode == "features" else None,
                    mode=mode,
                    present=mask[rows].any(0),
                    num_samples=len(rows),
                    **ctx,
                )
                tag = f"partial ({case}) {name}/{mode}"
                if res.extras["global_losses"].shape != (K,):
                    failures.append(f"{tag}: global_losses {res.extras['global_losses'].shape}")
                compare(f"{tag} weights", res_ref.weights, res.weights, failures)
                compare(f"{tag} grads", grads(reference), grads(model), failures)
    return {"failures": failures, "params": {}}


# -- the trainer ------------------------------------------------------------------------------
#: (method, mode) pairs the trainer runs under two ranks; the test compares each with a
#: single-process trainer on the same data.
TRAINER_CASES = [
    ("pcgrad", "params"),
    ("mgda", "features"),
    ("famo", "params"),
    ("uw", "params"),
    ("auto_lambda", "params"),
    ("sequential_reptile", "params"),
]


def tiny_trainer(
    method: str, mode: str, out_dir: str | None = None, epochs: int = 2, dropout: bool = False
):
    """A trainer on the tiny two-task problem (no dropout, so one process and two ranks see
    the same network), float32, global batch 7 (ranks hold 4 and 3)."""
    from polytask.train import TrainConfig, Trainer
    from tests.train._tiny import TinyNet, TwoTaskData, tiny_tasks

    torch.manual_seed(0)
    model = TinyNet().float()
    if not dropout:
        model.encoder[2].p = 0.0
    config = TrainConfig(
        epochs=epochs, batch_size=7, mode=mode, select="loss", seed=3, device="cpu"
    )
    # A fixed Jacobian strategy: "auto" times both and may pick another path after a
    # resume, which changes the rounding.
    fixed = {} if polytask.methods.get(method).family == "loss" else {"jacobian_strategy": "loop"}
    return Trainer(
        model,
        tiny_tasks(),
        polytask.methods.create(method, 2, seed=0, **fixed),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        TwoTaskData(30, 0),
        TwoTaskData(11, 1),
        TwoTaskData(9, 2),
        config=config,
        out_dir=out_dir,
    )


def trainer(rank: int, world: int) -> dict[str, Any]:
    torch.set_default_dtype(torch.float32)
    out: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    for method, mode in TRAINER_CASES:
        t = tiny_trainer(method, mode)
        result = t.fit()
        out[f"{method}/{mode}"] = params(t.model)
        histories[f"{method}/{mode}"] = result.history
    return {"failures": [], "params": out, "histories": histories}


def trainer_resume(rank: int, world: int) -> dict[str, Any]:
    """Interrupted after 3 steps and resumed from rank 0's checkpoint = uninterrupted, with
    dropout on (each rank draws its own masks, and resumes its own random state)."""
    torch.set_default_dtype(torch.float32)
    root = Path(os.environ["POLYTASK_TEST_OUT"])
    failures: list[str] = []
    finals = {}
    for method, mode in [("famo", "params"), ("nash_mtl", "features")]:
        first = tiny_trainer(method, mode, str(root / f"{method}-cut"), dropout=True)
        first.fit(stop_after_steps=3)
        dist.barrier()  # rank 0's checkpoint is on disk before anyone resumes
        resumed = tiny_trainer(method, mode, str(root / f"{method}-cut"), dropout=True)
        got = resumed.fit(resume=True)
        whole = tiny_trainer(method, mode, str(root / f"{method}-whole"), dropout=True)
        want = whole.fit()
        compare(f"{method} resumed params", params(whole.model), params(resumed.model), failures)
        compare(
            f"{method} resumed method",
            whole.method.state_dict(),
            resumed.method.state_dict(),
            failures,
        )
        compare(f"{method} resumed history", want.history, got.history, failures)
        finals[method] = params(resumed.model)
        files = sorted(p.name for p in (root / f"{method}-cut").iterdir())
        if rank == 0 and files != ["last.pt", "log.jsonl"]:
            failures.append(f"rank 0 wrote {files}")
    return {"failures": failures, "params": finals}


SCENARIOS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "every_method": every_method,
    "with_ddp": with_ddp,
    "with_fsdp": with_fsdp,
    "several_steps": several_steps,
    "sharded": sharded,
    "world_of_one": world_of_one,
    "uncounted": uncounted,
    "payloads": payloads,
    "misuse": misuse,
    "trainer": trainer,
    "routed": routed,
    "meta": meta,
    "rotograd": rotograd,
    "partial": partial,
    "sdmgrad_double_sampling": sdmgrad_double_sampling,
    "outside_ddp": outside_ddp,
    "ddp_overflow": ddp_overflow,
    "trainer_resume": trainer_resume,
}
