"""Decoder-side architectures for dense prediction: task interactions after a shared
backbone, through intermediate predictions, distillation and affinity propagation
(PAD-Net, MTI-Net, PAP-Net)."""

from polytask.archs.decoder import mti_net, pad_net, pap  # noqa: F401  importing registers them
