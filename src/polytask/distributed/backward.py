"""The distributed steps of :meth:`Method.backward`: each equals the single-process step on
the concatenation of the ranks' batches (rank order), whatever the ranks' batch sizes.

Notation: rank r holds n_r samples and its task losses L_r (means over its samples), so the
global losses are L = sum_r (n_r / N) L_r with N = sum_r n_r.

* Params mode: the global Jacobian is J = sum_r (n_r / N) J_r, whose Gramian has cross
  terms between ranks (it is not the mean of the ranks' Gramians). ``"full"``: ONE
  all-reduce of [n_r | n_r L_r | n_r J_r | n_r x the task-specific gradients]; every rank
  then holds J and L and computes the same update. ``"sharded"`` (Gramian methods): a
  reduce-scatter leaves each rank 1/R of J's columns, one all-reduce sums the K x K Gramian
  of the shards (with the counts, losses and task-specific gradients), and an all-gather
  of the weighted shards assembles the update.
* Features mode: each rank's features belong to its own samples, so the global feature
  Jacobian is the concatenation of the (n_r / N) J_r and its Gramian IS a sum: one
  all-reduce of [n_r | n_r L_r | n_r^2 G_r] (Gramian methods), or one all-gather of the
  ranks' feature Jacobians (the other methods, whose update is not a function of G).
  The backward through the encoder and heads is then an ordinary one, reduced by DDP/FSDP
  or, for a plain module, by one all-reduce of the step's gradients.
* Loss weightings: the global losses (one all-reduce of K + 1 numbers) enter the
  objective, whose gradient flows through this rank's graph scaled by n_r / N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from polytask.autograd import accumulate_grads, gramian, leaves_reached
from polytask.distributed.sync import task_counts
from polytask.errors import DistributedError

if TYPE_CHECKING:
    from polytask.distributed.sync import DistributedSync
    from polytask.methods.base import BackwardResult, GradientMethod, LossMethod

__all__ = ["fixed_weights_backward", "gradient_backward", "loss_backward", "reduce_backward"]


def _counts(ctx: dict[str, Any], losses: Tensor) -> Tensor:
    """This rank's per-task counts from (and out of) ``ctx``; see :func:`task_counts`."""
    return task_counts(ctx.pop("num_samples", None), losses.shape[0], losses.device)


def _reduce_xi_jacobians(method: Any, ctx: dict[str, Any], mode: str) -> None:
    """SDMGrad's Jacobians of two extra batches (this rank's shares, counted like the step's
    batch): their count-weighted means over the ranks, in one all-reduce (params mode)."""
    xi = ctx.get("xi_jacobians")
    if xi is None:
        return
    if mode != "params":
        raise DistributedError(
            f"{type(method).__name__}: xi_jacobians in features mode are Jacobians w.r.t. "
            "each rank's own samples, which polytask does not gather; use mode='params', or "
            "leave them out (SDMGrad then uses the step's own Jacobian)"
        )
    a, b = xi
    k = a.shape[0]
    n = _counts({"num_samples": ctx.get("num_samples")}, a[:, 0]).to(a.dtype)
    flat = torch.cat([n, (n[:, None] * a).reshape(-1), (n[:, None] * b.to(a)).reshape(-1)])
    method.sync.comm.all_reduce(flat)
    total = flat[:k, None]
    ctx["xi_jacobians"] = (
        flat[k : k + a.numel()].view_as(a) / total,
        (flat[k + a.numel() :].view_as(a) / total).to(b.dtype),
    )


# -- gradient reduction for the ``"polytask"`` reducer ------------------------------------
def _grads(outputs: list[Tensor], cotangents: list[Tensor], leaves: list[Tensor]) -> list:
    if not leaves:
        return []
    return list(
        torch.autograd.grad(
            outputs, leaves, grad_outputs=cotangents, retain_graph=True, allow_unused=True
        )
    )


def _canonical(
    sync: DistributedSync, leaves: list[Tensor], exclude: list[Tensor] = ()
) -> list[Tensor]:
    """The model's trainable parameters in their fixed order, then the other ``leaves``, less
    ``exclude``: the same list on every rank even where a rank's graph skips a parameter (an
    expert no sample of its batch was routed to)."""
    skip = {id(p) for p in exclude}
    if sync.model is None:
        return [p for p in leaves if id(p) not in skip]
    params = [p for p in sync.model.parameters() if p.requires_grad and id(p) not in skip]
    known = {id(p) for p in params} | skip
    return params + [p for p in leaves if id(p) not in known]


def _sum_and_accumulate(sync: DistributedSync, leaves: list[Tensor], grads: list) -> None:
    """All-reduce (sum) this step's gradients of ``leaves`` in one flat buffer and add them
    into ``.grad``: earlier accumulated gradients are not reduced again. A leaf that no rank
    reached keeps ``.grad`` as it was (``None`` stays ``None``, as in one process)."""
    if not leaves:
        return
    found = {id(p): g for p, g in zip(leaves, grads)}
    leaves = _canonical(sync, leaves)
    grads = [found.get(id(p)) for p in leaves]
    ref = next(g for g in [*grads, leaves[0]] if g is not None)
    flags = torch.tensor([g is not None for g in grads], dtype=ref.dtype, device=ref.device)
    flat = torch.cat(
        [flags]
        + [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
            for g, p in zip(grads, leaves)
        ]
    )
    sync.comm.all_reduce(flat)
    reached = flat[: len(leaves)] > 0
    offset = len(leaves)
    for p, hit in zip(leaves, reached.tolist()):
        n = p.numel()
        if hit:
            g = flat[offset : offset + n].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        offset += n


def reduce_backward(sync: DistributedSync, term: Tensor, num_samples: float | None) -> None:
    """Backward of a scalar ``term`` that each rank computed on its own samples (a model's
    regulariser or auxiliary loss): accumulates the count-weighted mean over the ranks of its
    gradient, the gradient of the term of the concatenated batch where it is a mean over
    samples."""
    n = 1.0 if num_samples is None else float(num_samples)
    total = sync.comm.all_reduce(term.detach().new_tensor([n], dtype=torch.float64))
    leaves = leaves_reached([term])
    grads = _grads([term], [torch.full_like(term, n / float(total[0]))], leaves)
    _sum_and_accumulate(sync, leaves, grads)


def _merge(pairs: list[tuple[list[Tensor], list]]) -> tuple[list[Tensor], list]:
    """Sum gradients of leaves that appear in several (leaves, grads) lists."""
    order: list[Tensor] = []
    total: dict[int, Tensor | None] = {}
    for leaves, grads in pairs:
        for leaf, g in zip(leaves, grads):
            key = id(leaf)
            if key not in total:
                order.append(leaf)
                total[key] = g
            elif g is not None:
                prev = total[key]
                total[key] = g if prev is None else prev + g
    return order, [total[id(leaf)] for leaf in order]


def _agree_on_context(sync: DistributedSync, ctx: dict[str, Any], like: Tensor) -> None:
    """Per-task context computed by each rank (KPIs, validation losses) becomes rank 0's, so
    that every rank's method sees the same objective."""
    for key in ("kpis", "val_losses"):
        value = ctx.get(key)
        if isinstance(value, Tensor):
            agreed = sync.comm.broadcast(value.detach().to(like.device, torch.float64).clone())
            ctx[key] = agreed.to(value.device, value.dtype)


def _run_parts(
    sync: DistributedSync,
    method: Any,
    parts: list[tuple[list[Tensor], list[Tensor], list[Tensor]]],
    wrapper: bool,
    *,
    own_global: bool,
) -> None:
    """The step's backward passes ``(outputs, cotangents, leaves)``, reduced over the ranks.

    The cotangents carry this rank's share (n_r / N, times R where the wrapper averages).
    With ``own_global`` (loss weightings), the method's own parameters see only global values
    (the same gradient on every rank) and are not reduced; otherwise (RotoGrad's rotations, in
    the model's graph) they are reduced like any parameter outside the wrapper. With a
    wrapper (DDP, FSDP), the parameters it holds get an ordinary backward that it reduces;
    under DDP any other parameter the losses reach (a loss module's) is summed over the ranks
    by polytask (under FSDP every parameter the losses reach must be in the FSDP module).
    Without one, polytask sums every gradient in one all-reduce.
    """
    own = {id(p) for p in method.parameters()} if own_global else set()
    # DDP's graph reaches the module's own parameters, so the others can be told apart.
    # FSDP's reaches unsharded copies of its parameters: every leaf is taken as FSDP's.
    ddp = wrapper and sync.wrapper == "ddp"
    held = own | ({id(p) for p in sync.model.parameters()} if ddp else set())  # type: ignore[union-attr]
    world = sync.comm.world_size
    pairs = []
    for outputs, cotangents, leaves in parts:
        if wrapper:
            inside = [p for p in leaves if id(p) in held] if ddp else leaves
            outside = [p for p in leaves if id(p) not in held] if ddp else []
            if outside:
                grads = _grads(outputs, cotangents, outside)
                pairs.append((outside, [None if g is None else g / world for g in grads]))
            if inside:
                torch.autograd.backward(
                    outputs, grad_tensors=cotangents, inputs=inside, retain_graph=True
                )
            continue
        model_leaves = [p for p in leaves if id(p) not in own]
        method_leaves = [p for p in leaves if id(p) in own]
        grads = _grads(outputs, cotangents, model_leaves + method_leaves)
        pairs.append((model_leaves, grads[: len(model_leaves)]))
        for p, g in zip(method_leaves, grads[len(model_leaves) :]):
            if g is not None:
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    if pairs:
        leaves, grads = _merge(pairs)
        _sum_and_accumulate(sync, leaves, grads)
    if wrapper:
        sync.verify_wrapper_reduced()


# -- loss weightings -------------------------------------------------------------------------
def loss_backward(
    method: LossMethod,
    losses: Tensor,
    ctx: dict[str, Any],
    *,
    shared: list[Tensor] | None = None,
) -> BackwardResult:
    """The distributed step of a loss weighting. With ``shared`` given (a method whose
    task-specific parameters take their unweighted gradients, as TaskCurriculum's), only
    ``shared`` get the objective's gradient and the other parameters that the losses reach
    get the gradient of sum_k L_k."""
    from polytask.methods.base import BackwardResult

    sync = method.sync
    assert sync is not None
    scale = ctx.pop("loss_scale", None)
    n = _counts(ctx, losses)
    comm = sync.comm
    _agree_on_context(sync, ctx, losses)
    k = losses.shape[0]
    payload = torch.cat([n, n * losses.detach().double()])
    comm.all_reduce(payload)
    global_losses = (payload[k:] / payload[:k]).to(losses.dtype)
    wrapper = sync.reducer() == "wrapper"
    c = (n / payload[:k] * (comm.world_size if wrapper else 1)).to(losses.dtype)
    # Value: the global losses; gradient: c x this rank's, so that the wrapper's mean (or
    # polytask's sum) over the ranks is the gradient of the global objective. The method's
    # own parameters (UW, IMTL-L) see only the global values: the same gradient everywhere.
    used = c * losses + (global_losses - c * losses).detach()
    total, weights = method.objective(used if scale is None else used / scale, **ctx)
    if scale is not None:
        total = total * scale
    if shared is None:
        parts = [([total], [torch.ones_like(total)], leaves_reached([total]))]
    else:
        task_leaves = leaves_reached([losses], exclude=shared)
        head_total = used.sum()
        parts = [
            ([total], [torch.ones_like(total)], shared),
            ([head_total], [torch.ones_like(head_total)], task_leaves),
        ]
    _run_parts(sync, method, parts, wrapper, own_global=True)
    return BackwardResult(weights=weights.detach(), extras={"global_losses": global_losses})


# -- gradient methods ------------------------------------------------------------------------
class _TaskGrads:
    """This rank's gradient of every task's loss w.r.t. the task-specific parameters (those
    the losses reach outside ``shared_params``), K rows, with a reached flag per parameter.

    With the model known, the layout is the model's parameters in their fixed order, so the
    ranks' buffers line up even where one rank's batch never reaches a parameter (a head or
    an expert no sample of its batch was routed to); such a parameter gets zero rows, and one
    that no rank reached keeps ``.grad`` as it was. Without the model, the parameters are
    those this rank's graph reaches, which must then be the same on every rank.
    """

    def __init__(
        self, engine: Any, losses: Tensor, shared: list[Tensor], sync: DistributedSync
    ) -> None:
        reached = leaves_reached([losses], exclude=shared)
        self.leaves = _canonical(sync, reached, exclude=shared)
        hit = {id(p) for p in reached}
        ref = losses.detach()
        self.flags = ref.new_tensor([float(id(p) in hit) for p in self.leaves])
        self.rows = engine(losses, self.leaves) if self.leaves else ref.new_zeros(len(ref), 0)
        self.width = self.rows.shape[1]

    def payload(self, counts: Tensor) -> Tensor:
        """[reached flags | counts[k] x task k's gradient rows], to be summed over ranks."""
        rows = counts.to(self.rows.dtype)[:, None] * self.rows
        return torch.cat([self.flags.to(rows.dtype), rows.reshape(-1)])

    def accumulate(self, reduced: Tensor, totals: Tensor, head_weights: Tensor) -> None:
        """Write sum_k head_weights[k] x task k's reduced gradient (its summed rows over the
        summed counts ``totals``) into ``.grad`` of each parameter some rank reached."""
        t = len(self.leaves)
        if t == 0:
            return
        rows = reduced[t:].view(-1, self.width) / totals.to(reduced)[:, None]
        combined = head_weights.detach().to(rows) @ rows
        offset = 0
        for p, flag in zip(self.leaves, (reduced[:t] > 0).tolist()):
            size = p.numel()
            if flag:
                g = combined[offset : offset + size].view_as(p).to(p.dtype)
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            offset += size


def _is_plain_gramian(method: GradientMethod) -> bool:
    from polytask.methods.base import GramianMethod

    return isinstance(method, GramianMethod) and (
        type(method)._aggregate is GramianMethod._aggregate
    )


def _gramian_weights(method: Any, g: Tensor, losses: Tensor, **kwargs: Any) -> Tensor:
    """Weights from the global Gramian, computed on every rank (so that the method's state
    advances identically) and then taken from rank 0, so that a solver's rounding on
    different hardware cannot split the ranks' updates."""
    w = method._weights(g, losses=losses, **kwargs).detach()
    return method.sync.comm.broadcast(w.clone().contiguous())


def gradient_backward(
    method: GradientMethod,
    losses: Tensor,
    shared: list[Tensor],
    features: Tensor | None,
    mode: str,
    ctx: dict[str, Any],
) -> BackwardResult:
    _reduce_xi_jacobians(method, ctx, mode)
    if mode == "params":
        return _params_backward(method, losses, shared, ctx)
    assert features is not None
    return _features_backward(method, losses, shared, features, ctx)


def _params_backward(
    method: GradientMethod, losses: Tensor, shared: list[Tensor], ctx: dict[str, Any]
) -> BackwardResult:
    from polytask.methods.base import _check_finite_rows, _skip_step, own_grads_scaled

    sync = method.sync
    assert sync is not None
    sync.check_params_mode(method)
    comm = sync.comm
    scale = ctx.pop("loss_scale", None)
    n = _counts(ctx, losses)
    k = losses.shape[0]
    _agree_on_context(sync, ctx, losses)
    jac = method.engine(losses, shared)
    heads = _TaskGrads(method.engine, losses, shared, sync)
    p_total = jac.shape[1]
    plain = _is_plain_gramian(method)
    sharded = plain and (
        sync.params_strategy == "sharded"
        or (sync.params_strategy == "auto" and k * p_total >= sync.shard_min_elements)
    )
    if sync.params_strategy == "sharded" and not plain:
        raise DistributedError(
            f"params_strategy='sharded' needs a method whose update is weights @ J with the "
            f"weights a function of the Gramian; {type(method).__name__} needs the whole "
            "Jacobian: use params_strategy='full' (or 'auto')"
        )
    dtype = jac.dtype
    nd = n.to(dtype)
    head_payload = heads.payload(nd)
    h = head_payload.numel()
    head = torch.cat([nd, nd * losses.detach().to(dtype), head_payload.to(dtype)])
    sizes = tuple(p.numel() for p in shared)
    if not sharded:
        payload = torch.cat([head, (nd[:, None] * jac).reshape(-1)])
        comm.all_reduce(payload)
        totals = payload[:k]
        global_losses = payload[k : 2 * k] / totals
        head_grads = payload[2 * k : 2 * k + h]
        jac = payload[2 * k + h :].view(k, p_total) / totals[:, None]
        if scale is not None:
            if not bool(torch.isfinite(jac).all()):
                return _skip_step(shared, "params", None)
            jac = jac / scale
        _check_finite_rows(jac, "gradient")
        true_losses = global_losses if scale is None else global_losses / scale
        if plain:
            g = gramian(jac)
            w = _gramian_weights(
                method, g, true_losses, param_sizes=sizes, mode="params", features=None, **ctx
            )
            direction = w.to(jac) @ jac
            weights, hw = w, method._head_weights(w)
            extras = {"gramian": g, **method._weight_extras()}
        else:
            with own_grads_scaled(method, scale):
                result = method._aggregate(
                    jac, losses=true_losses, param_sizes=sizes, mode="params", features=None, **ctx
                )
            direction, weights, hw = result.direction, result.weights, result.head_weights
            extras = dict(result.extras)
    else:
        world = comm.world_size
        padded = -(-p_total // world) * world
        block = torch.zeros(k, padded, dtype=dtype, device=jac.device)
        block[:, :p_total] = nd[:, None] * jac
        # Row-major [K, P'] scattered as R column blocks: transpose so each rank's shard is
        # a contiguous set of columns for every task.
        shards = block.view(k, world, padded // world).transpose(0, 1).reshape(-1)
        mine = comm.reduce_scatter(shards).view(k, padded // world)
        payload = torch.cat([head, (mine @ mine.T).reshape(-1)])
        comm.all_reduce(payload)
        totals = payload[:k]
        global_losses = payload[k : 2 * k] / totals
        head_grads = payload[2 * k : 2 * k + h]
        g = payload[2 * k + h :].view(k, k) / (totals[:, None] * totals[None, :])
        mine = mine / totals[:, None]
        if scale is not None:
            if not bool(torch.isfinite(g).all()):
                return _skip_step(shared, "params", None)
            g, mine = g / scale**2, mine / scale
        if not bool(torch.isfinite(g).all()):
            raise DistributedError(
                "the reduced Gramian is not finite; a task's gradient "
                "overflowed on some rank (lower the learning rate)"
            )
        true_losses = global_losses if scale is None else global_losses / scale
        w = _gramian_weights(
            method, g, true_losses, param_sizes=sizes, mode="params", features=None, **ctx
        )
        direction = comm.all_gather((w.to(mine) @ mine).contiguous())[:p_total]
        weights, hw = w, method._head_weights(w)
        extras = {"gramian": g, **method._weight_extras()}
    if not bool(torch.isfinite(direction).all()):
        raise DistributedError(
            f"{type(method).__name__} produced a non-finite update from finite reduced "
            "gradients; please report this as a bug"
        )
    head_weights = (
        hw if hw is not None else (weights if weights is not None else torch.ones(k, dtype=dtype))
    )
    heads.accumulate(head_grads, totals, head_weights)
    accumulate_grads(shared, direction if scale is None else direction * scale)
    norms = None if isinstance(extras.get("gramian"), Tensor) else jac.norm(dim=1)
    return _result(weights, hw, extras, norms, global_losses)


def _skip(shared: list[Tensor], features: Tensor, losses: Tensor, wrapper: bool) -> BackwardResult:
    """An fp16 step whose scaled gradients overflowed: NaN gradients, so that GradScaler
    skips it. Under DDP/FSDP every parameter the losses reach must take part in the
    backward (else the wrapper waits for them at the next step): NaN flows from the losses."""
    from polytask.methods.base import BackwardResult, _skip_step

    if not wrapper:
        return _skip_step(shared, "features", features)
    torch.autograd.backward(losses, grad_tensors=torch.full_like(losses, float("nan")))
    return BackwardResult(weights=None, extras={"found_inf": True})


def _features_backward(
    method: GradientMethod,
    losses: Tensor,
    shared: list[Tensor],
    features: Tensor,
    ctx: dict[str, Any],
) -> BackwardResult:
    from polytask.methods.base import _check_finite_rows, own_grads_scaled

    sync = method.sync
    assert sync is not None
    comm = sync.comm
    scale = ctx.pop("loss_scale", None)
    n = _counts(ctx, losses)
    _agree_on_context(sync, ctx, losses)
    k = losses.shape[0]
    wrapper = sync.reducer() == "wrapper"
    world = comm.world_size
    plain = _is_plain_gramian(method)
    local_cols = features.numel()
    if plain:
        g_local = method.engine.gramian(losses, [features])
        dtype = g_local.dtype
        nd = n.to(dtype)
        payload = torch.cat(
            [nd, nd * losses.detach().to(dtype), (nd[:, None] * nd[None, :] * g_local).reshape(-1)]
        )
        comm.all_reduce(payload)
        totals = payload[:k]
        global_losses = payload[k : 2 * k] / totals
        g = payload[2 * k :].view(k, k) / (totals[:, None] * totals[None, :])
        if scale is not None:
            if not bool(torch.isfinite(g).all()):
                return _skip(shared, features, losses, wrapper)
            g = g / scale**2
        true_losses = global_losses if scale is None else global_losses / scale
        w = _gramian_weights(
            method,
            g,
            true_losses,
            param_sizes=(local_cols,),
            mode="features",
            features=features,
            **ctx,
        )
        weights, hw, direction = w, method._head_weights(w), None
        extras = {"gramian": g, **method._weight_extras()}
    else:
        jac = method.engine(losses, [features])
        dtype = jac.dtype
        # Each rank's [count, losses, Jacobian, features] (Jacobian and features padded to the
        # widest rank's columns) in one all-gather, after a one-number all-gather of the
        # widths. The features' values go to methods that read them (ExcessMTL's per-sample
        # terms) as the global batch's.
        sizes_all = comm.all_gather(
            torch.tensor([local_cols], dtype=torch.int64, device=jac.device)
        )
        width = int(sizes_all.max())
        nd = n.to(dtype)
        row = torch.zeros(2 * k + (k + 1) * width, dtype=dtype, device=jac.device)
        row[:k] = nd
        row[k : 2 * k] = nd * losses.detach().to(dtype)
        row[2 * k : 2 * k + k * width].view(k, width)[:, :local_cols] = nd[:, None] * jac
        row[2 * k + k * width : 2 * k + k * width + local_cols] = features.detach().reshape(-1)
        gathered = comm.all_gather(row).view(world, -1)
        totals = gathered[:, :k].sum(0)
        global_losses = gathered[:, k : 2 * k].sum(0) / totals
        cols = [int(c) for c in sizes_all.tolist()]
        jac_all = (
            torch.cat(
                [
                    gathered[r, 2 * k : 2 * k + k * width].view(k, width)[:, : cols[r]]
                    for r in range(world)
                ],
                dim=1,
            )
            / totals[:, None]
        )
        global_features = (
            torch.cat(
                [gathered[r, 2 * k + k * width : 2 * k + k * width + cols[r]] for r in range(world)]
            )
            .view(-1, *features.shape[1:])
            .to(features.dtype)
        )
        if scale is not None:
            if not bool(torch.isfinite(jac_all).all()):
                return _skip(shared, features, losses, wrapper)
            jac_all = jac_all / scale
        _check_finite_rows(jac_all, "gradient")
        true_losses = global_losses if scale is None else global_losses / scale
        with own_grads_scaled(method, scale):
            result = method._aggregate(
                jac_all,
                losses=true_losses,
                param_sizes=(jac_all.shape[1],),
                mode="features",
                features=global_features,
                **ctx,
            )
        start = sum(cols[: comm.rank])
        direction = result.direction[start : start + local_cols]
        if scale is not None:
            direction = direction * scale
        if wrapper:
            direction = direction * world
        weights, hw, extras = result.weights, result.head_weights, dict(result.extras)
        extras.setdefault("gramian", None)
        extras["_jac_norms"] = jac_all.norm(dim=1)
    c = (n / totals.to(n) * (world if wrapper else 1)).to(losses.dtype)
    head_weights = (
        hw if hw is not None else (weights if weights is not None else torch.ones(k, dtype=dtype))
    )
    if direction is None:
        # Gramian methods: the update through the encoder is w @ J, the backward of
        # c sum_k w_k L_k; heads get c hw_k x their gradient.
        assert weights is not None
        if hw is None:
            outputs, cotangents = [losses], [c * weights.to(losses)]
            task_part = None
        else:
            (direction,) = torch.autograd.grad(
                losses, features, grad_outputs=c * weights.to(losses), retain_graph=True
            )
            task_part = c * hw.to(losses)
    else:
        task_part = c * head_weights.to(losses)
    if direction is None:
        parts = [(outputs, cotangents, leaves_reached([losses]))]
    else:
        task_leaves = leaves_reached([losses], stop_at=[features])
        parts = [
            ([losses], [task_part], task_leaves),
            (
                [features],
                [direction.view_as(features).to(features.dtype)],
                leaves_reached([features]),
            ),
        ]
    _run_parts(sync, method, parts, wrapper, own_global=False)
    return _result(weights, hw, extras, extras.pop("_jac_norms", None), global_losses)


def _result(
    weights: Tensor | None,
    head_weights: Tensor | None,
    extras: dict[str, Any],
    norms: Tensor | None,
    global_losses: Tensor,
) -> BackwardResult:
    """The step's :class:`BackwardResult`, with the task gradients' norms (from the Gramian
    where there is one, else ``norms``) and the global losses among the extras."""
    from polytask.methods.base import BackwardResult

    g = extras.pop("gramian", None)
    if isinstance(g, Tensor):
        norms = g.diagonal().clamp_min(0).sqrt()
    assert norms is not None
    extras["jacobian_norms"] = norms.detach()
    extras["global_losses"] = global_losses.detach()
    return BackwardResult(
        weights=None if weights is None else weights.detach(),
        gramian=g,
        extras=extras,
        head_weights=None if head_weights is None else head_weights.detach(),
    )


def fixed_weights_backward(
    method: Any,
    losses: Tensor,
    shared: list[Tensor],
    features: Tensor | None,
    mode: str,
    ctx: dict[str, Any],
    weights: Tensor,
    clip: Any,
) -> BackwardResult:
    """The step of sum_k a_k L_k with fixed weights ``a`` whose shared update is scaled by
    ``clip(norm)`` of the global update's norm (Nash-MTL's steps between two solves); the
    task-specific parameters take the unclipped gradient."""
    from polytask.methods.base import BackwardResult

    sync = method.sync
    assert sync is not None
    comm = sync.comm
    scale = ctx.pop("loss_scale", None) or 1.0
    n = _counts(ctx, losses)
    k = losses.shape[0]
    payload = torch.cat([n, n * losses.detach().double()])
    comm.all_reduce(payload)
    global_losses = (payload[k:] / payload[:k]).to(losses.dtype)
    share = (n / payload[:k]).to(losses.dtype)
    a = weights.detach().to(losses)
    total = (share * a * losses).sum()
    if mode == "features":
        assert features is not None
        wrapper = sync.reducer() == "wrapper"
        # This rank's block of the global update w.r.t. the concatenated features.
        (grad_f,) = torch.autograd.grad(total, features, retain_graph=True)
        square = comm.all_reduce(grad_f.detach().double().pow(2).sum().reshape(1))
        c = clip(float(square[0]) ** 0.5 / scale)
        r = comm.world_size if wrapper else 1
        parts = [
            ([losses], [r * share * a], leaves_reached([losses], stop_at=[features])),
            ([features], [c * r * grad_f], leaves_reached([features])),
        ]
        _run_parts(sync, method, parts, wrapper, own_global=False)
    else:
        sync.check_params_mode(method)
        heads = _canonical(sync, leaves_reached([losses], exclude=shared), exclude=shared)
        leaves = shared + heads
        grads = _grads([total], [torch.ones_like(total)], leaves)
        ref = total.detach()
        flags = ref.new_tensor([float(g is not None) for g in grads])
        flat = torch.cat(
            [flags]
            + [
                (g if g is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
                for g, p in zip(grads, leaves)
            ]
        )
        comm.all_reduce(flat)
        t, offset = len(leaves), len(leaves)
        shared_size = sum(p.numel() for p in shared)
        c = clip(float(flat[t : t + shared_size].double().norm()) / scale)
        for i, p in enumerate(leaves):
            size = p.numel()
            if float(flat[i]) > 0 or i < len(shared):
                g = flat[offset : offset + size].view_as(p).to(p.dtype)
                g = g * c if i < len(shared) else g
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            offset += size
    return BackwardResult(
        weights=(c * a).detach(),
        extras={
            "reused_weights": True,
            "nash_weights": a.detach(),
            "clip_coef": c,
            "global_losses": global_losses,
        },
        head_weights=a.detach(),
    )
