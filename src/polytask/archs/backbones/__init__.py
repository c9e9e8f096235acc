"""Single-task backbone networks that multi-task architectures take as encoders, stages or
heads: ResNet, SegNet, the Multi-MNIST LeNet, MLP, a small Transformer encoder and the QM9
message-passing encoder.

They are plain ``nn.Module`` networks, not registered architectures; this package has its own
small registry of factories:

>>> from polytask.archs import backbones
>>> "resnet50" in backbones.available()
True
>>> net = backbones.create("resnet50", replace_stride_with_dilation=[False, True, True])
"""

from polytask.archs.backbones._registry import BACKBONES, available, create, register_backbone
from polytask.archs.backbones.lenet import MultiLeNet, multi_lenet
from polytask.archs.backbones.mlp import MLP, mlp
from polytask.archs.backbones.mpnn import MPNNEncoder, mpnn_encoder, pack_graphs
from polytask.archs.backbones.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)
from polytask.archs.backbones.segnet import SegNet, SegNetFeatures, segnet
from polytask.archs.backbones.transformer import (
    TransformerBlock,
    TransformerEncoder,
    sinusoidal_positions,
    transformer_encoder,
)

__all__ = [
    "BACKBONES",
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "MPNNEncoder",
    "MultiLeNet",
    "ResNet",
    "SegNet",
    "SegNetFeatures",
    "TransformerBlock",
    "TransformerEncoder",
    "available",
    "create",
    "mlp",
    "mpnn_encoder",
    "multi_lenet",
    "pack_graphs",
    "register_backbone",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "segnet",
    "sinusoidal_positions",
    "transformer_encoder",
]
