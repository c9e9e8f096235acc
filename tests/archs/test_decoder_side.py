"""Paper-specific tests of the decoder-side architectures (PAD-Net, MTI-Net, PAP-Net)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import polytask
from polytask.archs.decoder._blocks import MultiModalDistillation, SEBlock
from polytask.archs.decoder.mti_net import FeaturePropagation
from polytask.archs.decoder.pap import affinity, diffuse

from .examples_soft import TinyBackbone, conv


def _image(seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# multi-modal distillation (PAD-Net, reused by MTI-Net)


@pytest.mark.parametrize("gate", ["target", "source"])
def test_distillation_is_attention_gated_message_passing(gate):
    torch.manual_seed(0)
    unit = MultiModalDistillation(["a", "b"], ["a", "b", "aux"], 3, gate)
    feats = {t: torch.randn(2, 3, 5, 5) for t in ("a", "b", "aux")}
    out = unit(feats)
    assert set(out) == {"a", "b"}
    for t in ("a", "b"):
        expected = feats[t].clone()
        for s in ("a", "b", "aux"):
            if s == t:
                continue
            g_in = feats[t] if gate == "target" else feats[s]
            gate_map = torch.sigmoid(F.conv2d(g_in, unit.attention[t][s].weight, padding=1))
            message = F.conv2d(feats[s], unit.message[t][s].weight, padding=1)
            expected = expected + gate_map * message
        torch.testing.assert_close(out[t], expected)
    assert set(unit.message["a"]) == {"b", "aux"}  # no message from a task to itself
    with pytest.raises(ValueError, match="gate"):
        MultiModalDistillation(["a"], ["a"], 3, "both")


# --------------------------------------------------------------------------------------
# PAD-Net


def _pad_net(**kw):
    return polytask.archs.create(
        "pad_net",
        tasks=["seg", "depth"],
        backbone=conv(3, 4, stride=2),
        backbone_channels=4,
        out_channels={"seg": 3, "depth": 1},
        channels=4,
        **kw,
    )


def test_pad_net_exposes_intermediate_predictions():
    torch.manual_seed(1)
    model = _pad_net(auxiliary={"normals": 3, "edges": 1}).eval()
    x = _image()
    out, intermediate = model.forward_with_intermediate(x)
    assert list(intermediate) == ["seg", "depth", "normals", "edges"]
    assert intermediate["normals"].shape == (2, 3, 8, 8)  # upsampled to the input
    assert out["seg"].shape == (2, 3, 8, 8) and out["depth"].shape == (2, 1, 8, 8)
    torch.testing.assert_close(model(x)["depth"], out["depth"])
    assert model.last_intermediate.keys() == intermediate.keys()
    # Supervising the intermediate predictions trains the intermediate convs (deep
    # supervision), which the final outputs alone do not reach.
    model.train()
    model(x)
    loss = sum(p.pow(2).mean() for p in model.last_intermediate.values())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.initial.parameters())


def test_pad_net_without_messages_is_independent_per_task():
    torch.manual_seed(2)
    model = _pad_net(auxiliary={"normals": 3}).eval()
    with torch.no_grad():
        for convs in model.distillation.message.values():
            for conv_ in convs.values():
                conv_.weight.zero_()
    x = _image()
    z = model.backbone(x)
    for t in ("seg", "depth"):
        expected = F.interpolate(
            model.decoders[t](model.features[t](z)), size=(8, 8), mode="bilinear"
        )
        torch.testing.assert_close(model(x)[t], expected)


def test_pad_net_bad_arguments():
    with pytest.raises(ValueError, match="one entry per task"):
        _pad_net_out({"seg": 3})
    with pytest.raises(ValueError, match="also final tasks"):
        _pad_net(auxiliary={"seg": 2})


def _pad_net_out(out_channels):
    return polytask.archs.create(
        "pad_net",
        tasks=["seg", "depth"],
        backbone=conv(3, 4),
        backbone_channels=4,
        out_channels=out_channels,
    )


# --------------------------------------------------------------------------------------
# MTI-Net


def test_fpm_mask_is_a_softmax_over_tasks():
    torch.manual_seed(3)
    fpm = FeaturePropagation(["a", "b", "c"], 4, se_reduction=2).eval()
    feats = {t: torch.randn(2, 4, 3, 3) for t in ("a", "b", "c")}
    stacked = torch.stack([feats[t] for t in ("a", "b", "c")], 1)
    logits = fpm.non_linear(stacked.reshape(2, 12, 3, 3)).reshape(2, 3, 4, 3, 3)
    mask = torch.softmax(logits, dim=1)
    torch.testing.assert_close(mask.sum(1), torch.ones(2, 4, 3, 3))
    shared = fpm.reduce((mask * stacked).reshape(2, 12, 3, 3))
    out = fpm(feats)
    for t in ("a", "b", "c"):
        torch.testing.assert_close(out[t], fpm.se[t](shared) + feats[t])


def test_se_block():
    se = SEBlock(4, reduction=16)
    assert se.squeeze[0].out_features == 1  # at least one hidden unit
    x = torch.randn(2, 4, 3, 3)
    scale = se.squeeze(x.mean((2, 3)))
    torch.testing.assert_close(se(x), x * scale[:, :, None, None])


def _mti_net(**kw):
    return polytask.archs.create(
        "mti_net",
        tasks=["seg", "depth"],
        backbone=TinyBackbone(),
        backbone_channels=[4, 6],
        out_channels={"seg": 3, "depth": 1},
        se_reduction=2,
        **kw,
    )


def test_mti_net_multi_scale_structure_and_intermediate():
    torch.manual_seed(4)
    model = _mti_net(auxiliary={"edges": 1}).eval()
    # Coarsest scale reads the backbone only; finer ones also the propagated task features.
    assert model.features[1]["seg"][0].body[0].in_channels == 6
    assert model.features[0]["seg"][0].body[0].in_channels == 4 + 6
    assert list(model.fpm) == ["1"]  # no FPM at the finest scale
    assert model.heads["seg"][0].in_channels == 4 + 6  # aggregation over both scales
    x = _image()
    out, intermediate = model.forward_with_intermediate(x)
    assert sorted(intermediate) == [0, 1]
    for s in (0, 1):
        assert list(intermediate[s]) == ["seg", "depth", "edges"]
        assert intermediate[s]["edges"].shape == (2, 1, 8, 8)
    assert out["seg"].shape == (2, 3, 8, 8)
    assert model.last_intermediate.keys() == {0, 1}


def test_mti_net_coarse_features_reach_fine_scale_through_fpm():
    torch.manual_seed(5)
    model = _mti_net().eval()
    x = _image()
    before = model(x)["seg"]
    with torch.no_grad():
        for p in model.fpm["1"].se["depth"].parameters():
            p.add_(1.0)
    # depth's FPM output feeds depth's fine-scale features, then seg's via distillation.
    assert not torch.allclose(model(x)["seg"], before)


def test_mti_net_single_scale_and_mismatch():
    model = polytask.archs.create(
        "mti_net",
        tasks=2,
        backbone=conv(3, 4),
        backbone_channels=[4],
        out_channels=2,
        se_reduction=2,
    )
    assert len(model.fpm) == 0
    assert model(_image())["task1"].shape == (2, 2, 8, 8)
    bad = _mti_net()
    bad.backbone = conv(3, 4)
    with pytest.raises(ValueError, match="1 feature maps"):
        bad(_image())


# --------------------------------------------------------------------------------------
# PAP-Net


def test_affinity_and_diffusion_by_hand():
    torch.manual_seed(6)
    e = torch.randn(1, 3, 2, 2)
    a = affinity(e)
    flat = e.reshape(3, 4)
    expected = torch.exp(flat.T @ flat)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(a[0], expected)
    x = torch.randn(1, 3, 2, 2)
    x0 = x.reshape(3, 4).T
    step1 = 0.3 * expected @ x0 + 0.7 * x0
    step2 = 0.3 * expected @ step1 + 0.7 * x0
    torch.testing.assert_close(diffuse(x, a, 0.3, 2), step2.T.reshape(1, 3, 2, 2))
    # A row-stochastic matrix keeps a constant map constant.
    const = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(diffuse(const, a, 0.9, 5), const)


def _pap(**kw):
    return polytask.archs.create(
        "pap",
        tasks=["seg", "depth"],
        backbone=conv(3, 4, stride=2),
        backbone_channels=4,
        out_channels={"seg": 3, "depth": 1},
        channels=4,
        **kw,
    )


def test_pap_cross_task_fusion_and_diffusion():
    torch.manual_seed(7)
    model = _pap(auxiliary={"normals": 3}, beta=0.4, steps=2).eval()
    with torch.no_grad():
        model.fusion["seg"].copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = _image()
    z = model.backbone(x)
    feats = {t: model.features[t](z) for t in ("seg", "depth", "normals")}
    mats = {t: affinity(model.embedding[t](feats[t])) for t in feats}
    w = torch.softmax(torch.tensor([0.5, -1.0, 2.0]), 0)
    fused = w[0] * mats["seg"] + w[1] * mats["depth"] + w[2] * mats["normals"]
    torch.testing.assert_close(model.fuse(mats, "seg"), fused)
    expected = F.interpolate(
        model.decoders["seg"](diffuse(feats["seg"], fused, 0.4, 2)), size=(8, 8), mode="bilinear"
    )
    torch.testing.assert_close(model(x)["seg"], expected)
    # Without diffusion each task's output is its own decoder on its own features.
    plain = _pap(steps=0).eval()
    zz = plain.backbone(x)
    expected = F.interpolate(
        plain.decoders["depth"](plain.features["depth"](zz)), size=(8, 8), mode="bilinear"
    )
    torch.testing.assert_close(plain(x)["depth"], expected)


def test_pap_affinity_size_and_arguments():
    model = _pap(affinity_size=2).eval()
    x = _image()
    feats = model.features["seg"](model.backbone(x))
    assert model.affinities({t: feats for t in model.sources})["seg"].shape == (2, 4, 4)
    assert model(x)["seg"].shape == (2, 3, 8, 8)
    assert set(model.last_intermediate) == {"seg", "depth"}
    with pytest.raises(ValueError, match="beta"):
        _pap(beta=1.5)
    with pytest.raises(ValueError, match="steps"):
        _pap(steps=-1)


@pytest.mark.parametrize("build", [_pad_net, _mti_net, _pap])
def test_models_copy_after_a_forward(build):
    # last_intermediate holds graph tensors; copies and pickles leave it out.
    model = build()
    out = model(_image())
    assert model.last_intermediate
    clone = copy.deepcopy(model)
    assert clone.last_intermediate == {}
    torch.testing.assert_close(clone.eval()(_image())["seg"], model.eval()(_image())["seg"])
    assert out["seg"].requires_grad
