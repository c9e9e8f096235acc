"""Building blocks shared by the expert architectures: MLPs, module specs, softmax gates.

An expert, a bottom or a tower is given either as the hidden widths of a ReLU MLP or as a
factory that builds any module. Factories receive the number of input features of the
module they build (``expert(in_features)``, ``tower(task, in_features)``), so one factory
serves every level of a multi-level network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError

__all__ = [
    "ModuleSpec",
    "SoftmaxGate",
    "TowerSpec",
    "build_module",
    "build_towers",
    "check_positive",
    "flat_input",
    "mix",
    "mlp",
    "output_features",
    "stack_experts",
]

#: Hidden widths of a ReLU MLP, or a factory ``(in_features) -> nn.Module``.
ModuleSpec = Sequence[int] | Callable[[int], nn.Module]
#: Hidden widths of a ReLU MLP tower (followed by a linear output layer), or a factory
#: ``(task, in_features) -> nn.Module``.
TowerSpec = Sequence[int] | Callable[[str, int], nn.Module]


def check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidHyperparameterError(f"{name}={value!r} must be a positive int")
    return value


def _widths(name: str, spec: Sequence[int]) -> list[int]:
    widths = list(spec)
    if not widths:
        raise InvalidHyperparameterError(f"{name}=[] gives no layer; give at least one width")
    for w in widths:
        check_positive(f"a width in {name}={widths}", w)
    return widths


def mlp(in_features: int, widths: Sequence[int], *, activate_last: bool = True) -> nn.Sequential:
    """Linear layers of the given widths, each followed by ReLU (the last one optionally)."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers.append(nn.Linear(in_features, width))
        if activate_last or i < len(widths) - 1:
            layers.append(nn.ReLU())
        in_features = width
    return nn.Sequential(*layers)


def _is_widths(spec: object) -> bool:
    return isinstance(spec, Sequence) and not isinstance(spec, str)


def output_features(name: str, spec: ModuleSpec, given: int | None) -> int | None:
    """The flattened size of a module's output: the last width of an MLP spec, else
    ``given`` (which a factory's user states, as it cannot be read from the factory)."""
    if _is_widths(spec):
        last = _widths(name, spec)[-1]  # type: ignore[arg-type]
        if given is not None and given != last:
            raise InvalidHyperparameterError(
                f"{name}_features={given} disagrees with the last width of {name}={list(spec)}; "  # type: ignore[arg-type]
                "leave it out for MLP specs"
            )
        return last
    if not callable(spec):
        raise TypeError(
            f"{name} must be a list of hidden widths or a factory (in_features) -> nn.Module, "
            f"got {spec!r}"
        )
    return None if given is None else check_positive(f"{name}_features", given)


def build_module(name: str, spec: ModuleSpec, in_features: int) -> nn.Module:
    """A ReLU MLP from widths (ReLU after every layer), or the factory's module."""
    if _is_widths(spec):
        return mlp(in_features, _widths(name, spec))  # type: ignore[arg-type]
    module = spec(in_features)  # type: ignore[operator]
    if not isinstance(module, nn.Module):
        raise TypeError(f"the {name} factory must return an nn.Module, got {type(module).__name__}")
    return module


def build_towers(
    tasks: Sequence[str],
    spec: TowerSpec,
    in_features: int | None,
    out_features: int | Mapping[str, int],
) -> nn.ModuleDict:
    """One tower per task: a ReLU MLP of the hidden widths then a linear layer to the
    task's ``out_features`` (logits, no activation), or the factory's module."""
    if isinstance(out_features, Mapping):
        missing = sorted(set(tasks) - set(out_features))
        if missing:
            raise InvalidHyperparameterError(
                f"out_features has no entry for tasks {missing}; give one per task"
            )
        outs = {t: check_positive(f"out_features[{t!r}]", out_features[t]) for t in tasks}
    else:
        outs = {t: check_positive("out_features", out_features) for t in tasks}
    if in_features is None:
        raise InvalidHyperparameterError(
            "the towers' input size is unknown: with an expert/bottom factory, give its output "
            "size as expert_features/bottom_features"
        )
    towers = nn.ModuleDict()
    for t in tasks:
        if _is_widths(spec):
            hidden = list(spec)  # type: ignore[arg-type]
            for w in hidden:
                check_positive(f"a width in tower={hidden}", w)
            body = mlp(in_features, hidden)
            last = hidden[-1] if hidden else in_features
            towers[t] = nn.Sequential(*body, nn.Linear(last, outs[t]))
        elif callable(spec):
            module = spec(t, in_features)
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"the tower factory must return an nn.Module, got {type(module).__name__}"
                )
            towers[t] = module
        else:
            raise TypeError(
                "tower must be a list of hidden widths or a factory (task, in_features) -> "
                f"nn.Module, got {spec!r}"
            )
    return towers


def flat_input(x: Tensor, in_features: int, owner: str) -> Tensor:
    """``x`` flattened to [B, in_features]: what the gates read."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise TypeError(f"{owner} needs a batched tensor input [B, ...], got {_describe(x)}")
    flat = x.flatten(1)
    if flat.shape[1] != in_features:
        raise ValueError(
            f"{owner} was built with in_features={in_features}, but the input has "
            f"{flat.shape[1]} features per example (shape {tuple(x.shape)})"
        )
    return flat


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


class SoftmaxGate(nn.Module):
    """The gate of MoE/MMoE/CGC/PLE: ``softmax(W x + b)`` over the experts.

    MMoE (Ma et al., KDD 2018) eq. 8 writes the gate as ``softmax(W_g x)``; we keep the
    bias of a linear layer, as LibMTL and the common open-source implementations do.
    """

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def mix(weights: Tensor, stacked: Tensor) -> Tensor:
    """Weighted sum over experts: weights [B, E] (or [E]), stacked [B, E, ...] -> [B, ...]."""
    if weights.dim() == 1:
        weights = weights.expand(stacked.shape[0], -1)
    shape = weights.shape + (1,) * (stacked.dim() - 2)
    return (weights.reshape(shape) * stacked).sum(dim=1)


def stack_experts(experts: nn.ModuleList, x: Tensor) -> Tensor:
    """Expert outputs stacked on dim 1: [B, E, ...]."""
    return torch.stack([e(x) for e in experts], dim=1)
