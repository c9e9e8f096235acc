"""Multi-layer perceptron with configurable widths, activation, dropout and batch norm."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from polytask.archs.backbones._registry import register_backbone

__all__ = ["MLP", "mlp"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def make_activation(activation: str | Callable[[], nn.Module]) -> nn.Module:
    """An activation module from its name (``relu``, ``gelu``, ...) or a factory."""
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation]()
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)} or pass "
                "a module factory such as nn.Softplus"
            ) from None
    if callable(activation):
        module = activation()
        if not isinstance(module, nn.Module):
            raise TypeError(f"activation factory {activation!r} returned {module!r}, not a Module")
        return module
    raise TypeError(f"activation must be a name or a module factory, got {activation!r}")


class MLP(nn.Sequential):
    """Multi-layer perceptron (Rumelhart, Hinton & Williams, "Learning representations by
    back-propagating errors", Nature 1986), the encoder and task tower of many MTL models.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]`` (batch norm:
    Ioffe & Szegedy, ICML 2015; dropout: Srivastava et al., JMLR 2014); the last layer is a
    plain ``Linear`` unless ``activate_last``, in which case it is a hidden layer too (for an
    encoder whose output feeds further layers).

    Args:
        widths: ``[in_features, hidden_1, ..., out_features]`` (at least two entries).
        activation: ``"relu"`` (default), ``"gelu"``, ``"silu"``, ``"elu"``, ``"leaky_relu"``,
            ``"tanh"``, ``"sigmoid"`` or a module factory.
        dropout: dropout probability after each hidden activation (0).
        batchnorm: batch-normalise each hidden layer before its activation (False).
        activate_last: treat the last layer as a hidden layer (False).

    Inputs ``[..., in_features]``; with ``batchnorm`` they must be ``[B, in_features]``.
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: str | Callable[[], nn.Module] = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        activate_last: bool = False,
    ) -> None:
        widths = list(widths)
        if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(
                f"widths={widths} must list at least the input and output sizes, all positive"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        make_activation(activation)  # fail now, not at the first hidden layer
        layers: list[nn.Module] = []
        n = len(widths) - 1
        for i in range(n):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < n - 1 or activate_last:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(widths[i + 1]))
                layers.append(make_activation(activation))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.in_features = widths[0]
        self.out_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


@register_backbone("mlp")
def mlp(**kwargs: object) -> MLP:
    """An MLP (keyword arguments as :class:`MLP`)."""
    return MLP(**kwargs)  # type: ignore[arg-type]
