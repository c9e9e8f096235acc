"""The LeNet-style Multi-MNIST encoder of Sener & Koltun (NeurIPS 2018)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from polytask.archs.backbones._registry import register_backbone

__all__ = ["MultiLeNet", "multi_lenet"]


class MultiLeNet(nn.Module):
    """LeNet-style shared encoder for Multi-MNIST / Multi-Fashion (Sener & Koltun, "Multi-Task
    Learning as Multi-Objective Optimization", NeurIPS 2018; after LeCun et al. 1998).

    ``conv(in, 10, 5) - maxpool 2 - ReLU - conv(10, 20, 5) - channel dropout - maxpool 2 -
    ReLU - flatten - fc(20 * s * s, 50) - ReLU``, where ``s = ((image_size - 4) // 2 - 4) // 2``
    (4 for the 28x28 images: fc(320, 50)). Output ``[B, out_features]``. The MGDA code's task
    heads are ``fc(50, 50) - ReLU - dropout - fc(50, 10)``: build them with
    ``MLP([50, 50, 10], dropout=0.5)``.

    Args:
        in_channels: image channels (1).
        image_size: side of the square input images (28).
        out_features: width of the representation (50).
        dropout: channel-dropout probability after the second convolution (0.5, the MGDA
            code's ``Dropout2d()``; 0 disables it).

    Departure from the MGDA code: its channel dropout draws one unscaled Bernoulli(0.5) mask
    per batch, shared by all images, and keeps that mask between the encoder passes of one
    iteration; here ``nn.Dropout2d`` draws a mask per image and rescales by 1/(1-p), so the
    expected activations are the same in training and evaluation (the official mask halves
    them in training only).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        out_features: int = 50,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for MultiLeNet (needs >= 16)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.out_features = out_features
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc = nn.Linear(20 * side * side, out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = self.conv2_drop(self.conv2(x))
        x = F.relu(F.max_pool2d(x, 2))
        return F.relu(self.fc(x.flatten(1)))


@register_backbone("multi_lenet")
def multi_lenet(**kwargs: object) -> MultiLeNet:
    """The Multi-MNIST LeNet encoder (keyword arguments as :class:`MultiLeNet`)."""
    return MultiLeNet(**kwargs)  # type: ignore[arg-type]
