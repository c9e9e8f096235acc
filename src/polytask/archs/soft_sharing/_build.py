"""Building blocks shared by the soft-sharing and decoder-side architectures.

The architectures take the user's network rather than hard-coding one. A *module spec*
(a head, a refinement block) is one of: an ``nn.Module`` (deep-copied once per task, so all
tasks start from the same weights, as the papers initialise every column from the same
pretrained network), a factory ``factory(task) -> module`` (called once per task), or a mapping
``{task: module}``. A *stages spec* is the same with a sequence of stage modules in place of
one module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

ModuleSpec = nn.Module | Callable[[str], nn.Module] | Mapping[str, nn.Module]
StagesSpec = (
    Sequence[nn.Module] | Callable[[str], Sequence[nn.Module]] | Mapping[str, Sequence[nn.Module]]
)

__all__ = [
    "ModuleSpec",
    "StagesSpec",
    "check_positions",
    "infer_out_channels",
    "per_task_modules",
    "per_task_stages",
    "resize_to",
    "stage_channels",
]


def per_task_modules(tasks: Sequence[str], spec: ModuleSpec, what: str) -> nn.ModuleDict:
    """One module per task from ``spec`` (a module to copy, ``factory(task)``, or a dict)."""
    if isinstance(spec, nn.Module):
        return nn.ModuleDict({t: copy.deepcopy(spec) for t in tasks})
    if isinstance(spec, Mapping):
        _check_keys(tasks, spec, what)
        for t in tasks:
            if not isinstance(spec[t], nn.Module):
                raise TypeError(f"{what}[{t!r}] must be an nn.Module, got {type(spec[t]).__name__}")
        return nn.ModuleDict({t: spec[t] for t in tasks})
    if callable(spec):
        out = {}
        for t in tasks:
            module = spec(t)
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"the {what} factory must return an nn.Module, got {type(module).__name__}"
                )
            out[t] = module
        return nn.ModuleDict(out)
    raise TypeError(
        f"{what} must be an nn.Module, a factory returning one, or a dict {{task: module}}; "
        f"got {type(spec).__name__}"
    )


def per_task_stages(tasks: Sequence[str], spec: StagesSpec, what: str) -> nn.ModuleDict:
    """One ``nn.ModuleList`` of stages per task, all with the same number of stages."""
    if isinstance(spec, Mapping):
        _check_keys(tasks, spec, what)
        columns = {t: _as_stage_list(spec[t], f"{what}[{t!r}]") for t in tasks}
    elif isinstance(spec, (nn.Sequential, nn.ModuleList)) or (
        isinstance(spec, Sequence) and not isinstance(spec, str)
    ):
        stages = _as_stage_list(spec, what)
        columns = {t: copy.deepcopy(stages) for t in tasks}
    elif callable(spec) and not isinstance(spec, nn.Module):
        columns = {t: _as_stage_list(spec(t), f"what the {what} factory returned") for t in tasks}
    else:
        raise TypeError(
            f"{what} must be a list of stage modules, a factory returning one, or a dict "
            f"{{task: list of stages}}; got {type(spec).__name__}"
        )
    counts = {t: len(c) for t, c in columns.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every task needs the same number of {what}; got {counts}")
    if len({id(m) for c in columns.values() for m in c}) != sum(counts.values()):
        raise ValueError(
            f"{what}: the same module object appears in two columns; give each task its own "
            "modules (or a list/factory, which this class copies per task)"
        )
    return nn.ModuleDict(columns)


def _as_stage_list(stages: Sequence[nn.Module], what: str) -> nn.ModuleList:
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{what} must be a list of stage modules, got one {type(stages).__name__}")
    stages = list(stages)
    if not stages:
        raise ValueError(f"{what} is empty; give at least one stage")
    for i, s in enumerate(stages):
        if not isinstance(s, nn.Module):
            raise TypeError(f"{what}[{i}] must be an nn.Module, got {type(s).__name__}")
    return nn.ModuleList(stages)


def _check_keys(tasks: Sequence[str], spec: Mapping[str, object], what: str) -> None:
    if set(spec) != set(tasks):
        raise ValueError(
            f"{what} must have exactly one entry per task {list(tasks)}; got keys {list(spec)}"
        )


def infer_out_channels(module: nn.Module) -> int | None:
    """The channel count a stage outputs, read from its last conv / linear / norm layer.

    ``None`` when the stage has no such layer (then the caller asks for ``channels=``).
    """
    for m in reversed(list(module.modules())):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d)):
            if m.num_features:
                return int(m.num_features)
        if isinstance(m, nn.GroupNorm):
            return int(m.num_channels)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(m.out_channels)
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return int(m.out_channels)
        if isinstance(m, nn.Linear):
            return int(m.out_features)
    return None


def check_positions(positions: Sequence[int] | None, num_stages: int, what: str) -> list[int]:
    """Sorted distinct stage indices in ``[0, num_stages)``; ``None`` means every stage."""
    if positions is None:
        return list(range(num_stages))
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"{what} must hold stage indices (ints), got {p!r}")
        q = p + num_stages if p < 0 else p
        if not 0 <= q < num_stages:
            raise ValueError(f"{what}: stage index {p} is out of range for {num_stages} stages")
        out.append(q)
    if len(set(out)) != len(out):
        raise ValueError(f"{what} repeats a stage: {list(positions)}")
    if not out:
        raise ValueError(f"{what} is empty; name at least one stage")
    return sorted(out)


def resize_to(x: Tensor, size: Sequence[int], *, down: str = "max") -> Tensor:
    """``x`` brought to spatial ``size``: bilinearly up; down by max pooling (MTAN's
    down-sampling) or bilinearly (``down="bilinear"``)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if down == "max" and all(a >= b for a, b in zip(x.shape[2:], size)):
        return F.adaptive_max_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def stage_channels(
    column: Sequence[nn.Module],
    positions: Sequence[int],
    channels: Sequence[int] | None,
    what: str,
    *,
    required: bool = True,
) -> dict[int, int | None]:
    """Output channel count of each stage in ``positions``: from ``channels`` (one per
    position) or inferred from the stage; raises when ``required`` and not inferable."""
    if channels is not None:
        if len(channels) != len(positions):
            raise ValueError(
                f"channels has {len(channels)} entries but {what} names {len(positions)} "
                f"stages ({list(positions)}); give one channel count per such stage"
            )
        return dict(zip(positions, (int(c) for c in channels)))
    out = {i: infer_out_channels(column[i]) for i in positions}
    unknown = [i for i, c in out.items() if c is None]
    if required and unknown:
        raise ValueError(
            f"cannot infer the channel count of stages {unknown} (no conv/linear/norm layer); "
            f"pass channels=[...] with one count per stage in {what}"
        )
    return out
