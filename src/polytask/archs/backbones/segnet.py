"""SegNet encoder-decoder (Badrinarayanan et al., TPAMI 2017) as used in MTAN and LibMTL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn import functional as F

from polytask.archs.backbones._registry import register_backbone

__all__ = ["SegNet", "SegNetFeatures", "segnet"]


class SegNetFeatures(NamedTuple):
    """Every intermediate map of one SegNet pass, per block (block 0 = full resolution).

    ``encoder[i]`` / ``decoder[i]`` are the pairs (output of the block's first convolution
    layer, output of its following convolution layers) that MTAN's attention modules read;
    ``output`` is the last decoder map, the network's output.
    """

    encoder: list[tuple[Tensor, Tensor]]
    decoder: list[tuple[Tensor, Tensor]]
    output: Tensor


def _conv_layer(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True))


class SegNet(nn.Module):
    """SegNet encoder-decoder with max-pooling indices (Badrinarayanan, Kendall & Cipolla,
    "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image Segmentation",
    TPAMI 2017), in the form of the MTAN code (Liu, Johns & Davison, CVPR 2019) that LibMTL
    and most NYUv2/Cityscapes MTL papers use.

    Encoder block i: a 3x3 conv-BN-ReLU layer to ``filters[i]`` channels, then one (blocks 0
    and 1) or two (later blocks) more such layers, then 2x2 max-pooling that keeps its
    indices. The decoder mirrors it: max-unpooling with the encoder's indices, a layer back to
    ``filters[i-1]`` channels, then one or two more. The output is the last decoder map,
    ``[B, filters[0], H, W]``, which the task heads read (MTAN's "split" heads are a 3x3 and
    a 1x1 convolution per task). Module names (``encoder_block``, ``conv_block_enc``,
    ``decoder_block``, ``conv_block_dec``) are those of the MTAN code, so the trunk of an
    MTAN SegNet checkpoint loads into it.

    Args:
        in_channels: image channels (3).
        filters: channels per block; MTAN's default is ``(64, 128, 256, 512, 512)`` (its
            "wide" variant ends with 1024). Fewer entries give fewer blocks (for small images
            and tests); H and W must be at least ``2 ** len(filters)``.

    Initialisation as MTAN: Xavier-normal convolution weights, zero biases, BN weight 1 and
    bias 0. Departure: unpooling is given the pre-pooling size, so inputs whose sides are not
    multiples of ``2 ** len(filters)`` come back at their own size (the MTAN code needs
    multiples; for them the result is identical).
    """

    def __init__(
        self, in_channels: int = 3, filters: Sequence[int] = (64, 128, 256, 512, 512)
    ) -> None:
        super().__init__()
        filters = list(filters)
        if not filters or any(not isinstance(f, int) or f < 1 for f in filters):
            raise ValueError(f"filters={filters} must be a non-empty list of positive ints")
        self.filters = filters
        self.out_channels = filters[0]
        n = len(filters)
        prev = [in_channels, *filters[:-1]]
        self.encoder_block = nn.ModuleList(_conv_layer(prev[i], filters[i]) for i in range(n))
        self.conv_block_enc = nn.ModuleList(self._extra(filters[i], i) for i in range(n))
        # Decoder block i maps block i's channels back to block i-1's (block 0 keeps them).
        back = [filters[0], *filters[:-1]]
        self.decoder_block = nn.ModuleList(_conv_layer(filters[i], back[i]) for i in range(n))
        self.conv_block_dec = nn.ModuleList(self._extra(back[i], i) for i in range(n))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _extra(channels: int, block: int) -> nn.Sequential:
        if block < 2:
            return _conv_layer(channels, channels)
        return nn.Sequential(_conv_layer(channels, channels), _conv_layer(channels, channels))

    def forward_features(self, x: Tensor) -> SegNetFeatures:
        """One pass, returning every block's intermediate maps (see :class:`SegNetFeatures`)."""
        n = len(self.filters)
        if x.dim() != 4 or min(x.shape[-2:]) < 2**n:
            raise ValueError(
                f"SegNet with {n} blocks needs images [B, C, H, W] with H, W >= {2**n}; got "
                f"shape {tuple(x.shape)} (use fewer filters for smaller images)"
            )
        encoder, pooled = [], []
        h = x
        for i in range(n):
            first = self.encoder_block[i](h)
            second = self.conv_block_enc[i](first)
            encoder.append((first, second))
            h, idx = F.max_pool2d(second, 2, 2, return_indices=True)
            pooled.append((idx, second.shape[-2:]))
        decoder = []
        for i in reversed(range(n)):
            idx, size = pooled[i]
            up = F.max_unpool2d(h, idx, 2, 2, output_size=size)
            first = self.decoder_block[i](up)
            h = self.conv_block_dec[i](first)
            decoder.append((first, h))
        return SegNetFeatures(encoder, decoder[::-1], h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).output


@register_backbone("segnet")
def segnet(**kwargs: object) -> SegNet:
    """The MTAN SegNet (keyword arguments as :class:`SegNet`)."""
    return SegNet(**kwargs)  # type: ignore[arg-type]
