"""Backbones: ResNet (torchvision counts and keys, dilation against LibMTL), SegNet (MTAN's
layout and count), the Multi-MNIST LeNet, MLP and the pre-LN Transformer encoder."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from polytask.archs import backbones
from polytask.archs.backbones import (
    MLP,
    MultiLeNet,
    SegNet,
    TransformerEncoder,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    sinusoidal_positions,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------
# ResNet: parameter counts and state_dict layout of torchvision


@pytest.mark.parametrize(
    ("factory", "num_classes", "count"),
    [
        # torchvision's published counts (with the 1000-class fc) ...
        (resnet18, 1000, 11_689_512),
        (resnet34, 1000, 21_797_672),
        (resnet50, 1000, 25_557_032),
        (resnet101, 1000, 44_549_160),
        # ... and without it: minus 512*1000 + 1000 and 2048*1000 + 1000.
        (resnet18, None, 11_689_512 - 513_000),
        (resnet50, None, 25_557_032 - 2_049_000),
    ],
)
def test_resnet_parameter_counts(factory, num_classes, count):
    with torch.device("meta"):
        model = factory(num_classes=num_classes)
    assert n_params(model) == count


# torchvision.models.resnet18().state_dict(): every convolution and linear weight with its
# shape, and every BatchNorm with its channel count (weight, bias, running_mean,
# running_var, num_batches_tracked).
RESNET18_WEIGHTS = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.1.conv1.weight": (64, 64, 3, 3),
    "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.1.conv1.weight": (128, 128, 3, 3),
    "layer2.1.conv2.weight": (128, 128, 3, 3),
    "layer3.0.conv1.weight": (256, 128, 3, 3),
    "layer3.0.conv2.weight": (256, 256, 3, 3),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "layer3.1.conv1.weight": (256, 256, 3, 3),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer4.0.conv1.weight": (512, 256, 3, 3),
    "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.1.conv1.weight": (512, 512, 3, 3),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
RESNET18_BATCHNORMS = {
    "bn1": 64,
    "layer1.0.bn1": 64,
    "layer1.0.bn2": 64,
    "layer1.1.bn1": 64,
    "layer1.1.bn2": 64,
    "layer2.0.bn1": 128,
    "layer2.0.bn2": 128,
    "layer2.0.downsample.1": 128,
    "layer2.1.bn1": 128,
    "layer2.1.bn2": 128,
    "layer3.0.bn1": 256,
    "layer3.0.bn2": 256,
    "layer3.0.downsample.1": 256,
    "layer3.1.bn1": 256,
    "layer3.1.bn2": 256,
    "layer4.0.bn1": 512,
    "layer4.0.bn2": 512,
    "layer4.0.downsample.1": 512,
    "layer4.1.bn1": 512,
    "layer4.1.bn2": 512,
}


def expand_batchnorms(bns: dict[str, int]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, c in bns.items():
        for key in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.{key}"] = (c,)
        out[f"{name}.num_batches_tracked"] = ()
    return out


def test_resnet18_state_dict_matches_torchvision_layout():
    expected = {**RESNET18_WEIGHTS, **expand_batchnorms(RESNET18_BATCHNORMS)}
    assert len(expected) == 122
    with torch.device("meta"):
        model = resnet18(num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_resnet18_loads_a_torchvision_style_checkpoint():
    # A checkpoint with exactly torchvision's keys and shapes loads strictly, and without
    # the classifier the only unexpected keys are fc's.
    expected = {**RESNET18_WEIGHTS, **expand_batchnorms(RESNET18_BATCHNORMS)}
    g = torch.Generator().manual_seed(0)
    checkpoint = {
        k: (torch.tensor(7) if s == () else torch.randn(s, generator=g))
        for k, s in expected.items()
    }
    model = resnet18(num_classes=1000)
    model.load_state_dict(checkpoint, strict=True)
    torch.testing.assert_close(model.fc.weight, checkpoint["fc.weight"])
    backbone = resnet18()
    result = backbone.load_state_dict(checkpoint, strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(backbone.layer3[0].conv2.weight, checkpoint["layer3.0.conv2.weight"])


def test_resnet50_state_dict_layout():
    with torch.device("meta"):
        model = resnet50(num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # 53 convolutions + 53 BatchNorms x 5 entries + fc weight and bias, as torchvision.
    assert len(got) == 53 + 53 * 5 + 2 == 320
    expected_part = {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.conv3.weight": (512, 128, 1, 1),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        **expand_batchnorms({"layer1.0.bn3": 256, "layer4.0.downsample.1": 2048}),
    }
    assert {k: got[k] for k in expected_part} == expected_part


# ---------------------------------------------------------------------------------------
# ResNet: outputs and dilation


def test_resnet_output_shapes_and_output_stride():
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = resnet18().eval()
        assert plain(x).shape == (1, 512, 2, 2) and plain.output_stride == 32
        stages = plain(x, return_stages=True)
        assert [tuple(s.shape[1:]) for s in stages] == [
            (64, 16, 16),
            (64, 16, 16),
            (128, 8, 8),
            (256, 4, 4),
            (512, 2, 2),
        ]
        assert plain.stage_channels == [s.shape[1] for s in stages]
        os16 = resnet18(replace_stride_with_dilation=[False, False, True]).eval()
        assert os16(x).shape == (1, 512, 4, 4) and os16.output_stride == 16
        os8 = resnet18(replace_stride_with_dilation=[False, True, True]).eval()
        assert os8(x).shape == (1, 512, 8, 8) and os8.output_stride == 8
        assert resnet18(global_pool=True)(x).shape == (1, 512)
        assert resnet18(num_classes=7)(x).shape == (1, 7)


def test_resnet_stages_compose_to_forward():
    torch.manual_seed(0)
    model = resnet18(replace_stride_with_dilation=[False, True, True]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = x
        for stage in model.stages():
            h = stage(h)
        torch.testing.assert_close(h, model(x))
    # The stages hold the network's own modules (no copies).
    assert model.stages()[0][0] is model.conv1 and model.stages()[4] is model.layer4


def test_resnet_zero_init_residual_zeroes_each_blocks_last_bn():
    for model, last in (
        (resnet18(zero_init_residual=True), "bn2"),
        (resnet50(zero_init_residual=True), "bn3"),
    ):
        blocks = [b for layer in model.stages()[1:] for b in layer]
        assert all(not getattr(b, last).weight.detach().any() for b in blocks)
        assert all(b.bn1.weight.detach().eq(1).all() for b in blocks)


@pytest.mark.parametrize(
    "bad",
    [
        {"replace_stride_with_dilation": [True, True]},
        {"replace_stride_with_dilation": [0, 1, 1]},
        {"num_classes": 0},
    ],
)
def test_resnet_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        resnet18(**bad)


@pytest.fixture(scope="module")
def libmtl_resnet_dilated():
    """LibMTL's ``ResnetDilated`` (the dilated ResNet of its NYUv2/Cityscapes examples),
    loaded by path: its package imports torchvision, which is absent."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("LibMTL is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "resnet_dilated.py"
    stubs = {n: types.ModuleType(n) for n in ("LibMTL", "LibMTL.model", "LibMTL.model.resnet")}
    stubs["LibMTL"].model = stubs["LibMTL.model"]  # type: ignore[attr-defined]
    stubs["LibMTL.model"].resnet = stubs["LibMTL.model.resnet"]  # type: ignore[attr-defined]
    with mock.patch.dict(sys.modules, stubs):
        mod_spec = importlib.util.spec_from_file_location("_libmtl_resnet_dilated", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    return module.ResnetDilated


@pytest.mark.parametrize("factory", [resnet18, resnet50])
@pytest.mark.parametrize(
    ("scale", "dilate"), [(8, [False, True, True]), (16, [False, False, True])]
)
def test_dilation_matches_libmtl(libmtl_resnet_dilated, factory, scale, dilate):
    # LibMTL (after the CSAIL segmentation code) dilates a plain ResNet in place: strided
    # convolutions lose their stride and 3x3 ones get half the dilation, the others the full
    # one. Same weights -> same geometry for every convolution and the same output.
    torch.manual_seed(0)
    ours = factory(replace_stride_with_dilation=dilate).eval()
    plain = factory()
    plain.load_state_dict(ours.state_dict())
    plain.feature_dim = plain.out_channels  # read by ResnetDilated's constructor
    reference = libmtl_resnet_dilated(plain, dilate_scale=scale).eval()
    mine = dict(ours.named_modules())
    for name, m in plain.named_modules():
        if isinstance(m, nn.Conv2d):
            o = mine[name]
            assert (o.stride, o.dilation, o.padding) == (m.stride, m.dilation, m.padding), name
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


# ---------------------------------------------------------------------------------------
# SegNet


def test_segnet_parameter_count_is_mtans():
    # MTAN's single-task SegNet (model_segnet_single.py, semantic head: a 3x3 conv 64->64 and
    # a 1x1 conv 64->13, both with bias) has 24,981,069 parameters, the reference count its
    # scripts divide by.
    with torch.device("meta"):
        trunk = SegNet()
    head = (64 * 64 * 9 + 64) + (64 * 13 + 13)
    assert n_params(trunk) + head == 24_981_069


def test_segnet_keys_follow_mtan():
    with torch.device("meta"):
        model = SegNet()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected_part = {
        "encoder_block.0.0.weight": (64, 3, 3, 3),
        "encoder_block.4.0.weight": (512, 512, 3, 3),
        "conv_block_enc.1.0.weight": (128, 128, 3, 3),
        "conv_block_enc.2.1.0.weight": (256, 256, 3, 3),
        "decoder_block.4.0.weight": (512, 512, 3, 3),
        "decoder_block.3.0.weight": (256, 512, 3, 3),
        "decoder_block.1.0.weight": (64, 128, 3, 3),
        "decoder_block.0.0.weight": (64, 64, 3, 3),
        "conv_block_dec.1.0.weight": (64, 64, 3, 3),
        "conv_block_dec.2.0.0.weight": (128, 128, 3, 3),
        "conv_block_dec.4.1.1.weight": (512,),
    }
    assert {k: got[k] for k in expected_part} == expected_part


def test_segnet_shapes_and_features():
    torch.manual_seed(0)
    model = SegNet(in_channels=3, filters=(4, 6, 8)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.output.shape == (2, 4, 16, 16)
        torch.testing.assert_close(model(x), feats.output)
        assert [tuple(f.shape[1:]) for f, _ in feats.encoder] == [(4, 16, 16), (6, 8, 8), (8, 4, 4)]
        assert [tuple(s.shape[1:]) for _, s in feats.decoder] == [(4, 16, 16), (4, 8, 8), (6, 4, 4)]
        # Sides that are not multiples of 2^blocks come back at their own size.
        assert model(torch.randn(1, 3, 12, 20)).shape == (1, 4, 12, 20)
    with pytest.raises(ValueError, match="H, W >= 8"):
        model(torch.randn(1, 3, 6, 16))


def test_segnet_unpools_with_the_pooling_indices():
    # One block whose four conv layers are identities (centre tap 1, zero bias; BN in eval
    # mode divides by sqrt(1 + eps)). An input with one positive pixel per 2x2 window comes
    # back with those pixels only: max-unpooling puts each maximum back at its own position
    # (an upsampling without indices would fill the whole window).
    model = SegNet(in_channels=1, filters=(1,)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.weight[0, 0, 1, 1] = 1.0
        x = torch.zeros(1, 1, 4, 4)
        x[0, 0, 0, 1], x[0, 0, 3, 3], x[0, 0, 2, 0], x[0, 0, 1, 2] = 1.0, 2.0, 3.0, 4.0
        bn = (1 + model.encoder_block[0][1].eps) ** -0.5
        torch.testing.assert_close(model(x), x * bn**4)


# ---------------------------------------------------------------------------------------
# LeNet, MLP


def test_multi_lenet_matches_the_mgda_encoder():
    torch.manual_seed(0)
    model = MultiLeNet()
    # conv(1,10,5) + conv(10,20,5) + fc(320,50), with biases.
    assert n_params(model) == (10 * 25 + 10) + (20 * 10 * 25 + 20) + (320 * 50 + 50)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    out = model(x)
    assert out.shape == (3, 50) and bool((out >= 0).all())
    torch.testing.assert_close(model(x), out)
    model.train()
    assert not torch.equal(model(x), out)  # channel dropout is active in training
    assert MultiLeNet(in_channels=3, image_size=36).fc.in_features == 20 * 6 * 6
    with pytest.raises(ValueError, match="image_size=12"):
        MultiLeNet(image_size=12)


def test_mlp_layers():
    m = MLP([4, 8, 6, 3], activation="gelu", dropout=0.1, batchnorm=True)
    kinds = [type(x).__name__ for x in m]
    assert kinds == [
        "Linear", "BatchNorm1d", "GELU", "Dropout",
        "Linear", "BatchNorm1d", "GELU", "Dropout",
        "Linear",
    ]  # fmt: skip
    assert n_params(m) == (4 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + (6 * 3 + 3)
    assert m(torch.randn(5, 4)).shape == (5, 3)
    last = MLP([4, 2], activate_last=True)
    assert [type(x).__name__ for x in last] == ["Linear", "ReLU"]
    assert bool((last(torch.randn(7, 4)) >= 0).all())
    assert [type(x).__name__ for x in MLP([4, 2], activation=nn.Softplus)] == ["Linear"]
    with pytest.raises(ValueError, match="swish"):
        MLP([4, 2], activation="swish")
    with pytest.raises(ValueError, match="widths"):
        MLP([4])


# ---------------------------------------------------------------------------------------
# Transformer encoder


def tiny_transformer(**kw) -> TransformerEncoder:
    torch.manual_seed(0)
    args = {"dim": 8, "num_layers": 2, "num_heads": 2, "dropout": 0.0}
    return TransformerEncoder(**{**args, **kw}).eval()


def test_sinusoidal_positions_formula():
    pe = sinusoidal_positions(5, 6)
    assert pe.shape == (5, 6)
    # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
    assert math.isclose(float(pe[1, 0]), math.sin(1.0), rel_tol=1e-6)
    assert math.isclose(float(pe[1, 1]), math.cos(1.0), rel_tol=1e-6)
    assert math.isclose(float(pe[3, 2]), math.sin(3 / 10000 ** (2 / 6)), rel_tol=1e-6)
    assert math.isclose(float(pe[4, 5]), math.cos(4 / 10000 ** (4 / 6)), rel_tol=1e-6)


def test_transformer_shapes():
    tokens = torch.randint(1, 20, (3, 5))
    assert tiny_transformer(vocab_size=20)(tokens).shape == (3, 8)
    assert tiny_transformer(vocab_size=20, pooling="mean")(tokens).shape == (3, 8)
    assert tiny_transformer(vocab_size=20, pooling=None)(tokens).shape == (3, 5, 8)
    feats = torch.randn(3, 5, 4)
    model = tiny_transformer(input_dim=4, positions="sinusoidal", pooling=None)
    assert model(feats).shape == (3, 5, 8)
    assert "pos_table" not in model.state_dict()  # fixed encodings are not checkpointed


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_ignores_padding(pooling):
    # Appending padded positions (masked from attention and from the mean) leaves the
    # pooled representation unchanged.
    model = tiny_transformer(vocab_size=20, padding_idx=0, pooling=pooling)
    tokens = torch.randint(1, 20, (2, 4))
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(tokens))


def test_transformer_without_positions_is_permutation_equivariant():
    model = tiny_transformer(input_dim=4, positions=None, pooling=None)
    x = torch.randn(2, 5, 4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, perm]), model(x)[:, perm])
        learned = tiny_transformer(input_dim=4, positions="sinusoidal", pooling=None)
        assert not torch.allclose(learned(x[:, perm]), learned(x)[:, perm])


def test_transformer_blocks_are_pre_ln():
    # Pre-LN keeps the residual stream un-normalised: with zero output projections a block
    # is exactly the identity (a post-LN block would return LayerNorm(x)).
    model = tiny_transformer(input_dim=4)
    block = model.blocks[0]
    with torch.no_grad():
        block.attn.out_proj.weight.zero_()
        block.attn.out_proj.bias.zero_()
        block.ffn[-1].weight.zero_()
        block.ffn[-1].bias.zero_()
        x = 3.0 * torch.randn(2, 5, 8) + 1.0
        torch.testing.assert_close(block(x), x)


def test_transformer_errors():
    with pytest.raises(ValueError, match="exactly one of vocab_size"):
        TransformerEncoder(8, 1, 2, vocab_size=5, input_dim=3)
    with pytest.raises(ValueError, match="num_heads=3"):
        TransformerEncoder(8, 1, 3, input_dim=3)
    model = tiny_transformer(vocab_size=20, padding_idx=0, pooling="mean")
    with pytest.raises(ValueError, match="entirely padding"):
        model(torch.tensor([[0, 0], [1, 2]]))
    with pytest.raises(ValueError, match="max_len=4"):
        tiny_transformer(vocab_size=20, max_len=4)(torch.ones(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# registry


def test_backbone_registry():
    assert {"resnet18", "resnet50", "segnet", "multi_lenet", "mlp", "transformer_encoder"} <= set(
        backbones.available()
    )
    model = backbones.create("mlp", widths=[3, 2])
    assert isinstance(model, MLP)
    with pytest.raises(ValueError, match="resnet18"):
        backbones.create("resnet81")
    # Backbones are not multi-task architectures.
    import polytask

    assert not set(backbones.available()) & set(polytask.archs.available())
