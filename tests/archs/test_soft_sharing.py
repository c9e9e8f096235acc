"""Paper-specific tests of the soft-sharing architectures (cross-stitch, sluice, NDDR, MTAN,
modulation, PS-MCNN), with differential tests of cross-stitch and MTAN against LibMTL 1.1.5."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import polytask
from polytask.archs.soft_sharing.nddr import NDDRLayer
from polytask.errors import InvalidHyperparameterError

from .._libmtl import bare_package, libmtl_root
from .examples_soft import conv


def _image(seed: int = 0, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _linear_column(width: int = 4, depth: int = 2) -> list[nn.Module]:
    """Bias-free 1x1 conv stages: the units' algebra can be checked by hand."""
    return [nn.Conv2d(width, width, 1, bias=False) for _ in range(depth)]


# --------------------------------------------------------------------------------------
# cross-stitch


def test_cross_stitch_identity_init_reproduces_independent_networks():
    # The paper's sanity point: with alpha = I the units pass each column's activation
    # through unchanged, so the model is K separate single-task networks.
    torch.manual_seed(0)
    stages = {t: [conv(3, 4), conv(4, 4), conv(4, 4)] for t in ("a", "b", "c")}
    heads = {t: nn.Conv2d(4, 2, 1) for t in ("a", "b", "c")}
    independent = {
        t: nn.Sequential(*copy.deepcopy(stages[t]), copy.deepcopy(heads[t])) for t in stages
    }
    model = polytask.archs.create(
        "cross_stitch",
        tasks=["a", "b", "c"],
        stages=stages,
        heads=heads,
        alpha_self=1.0,
        alpha_other=0.0,
        channel_wise=True,
    )
    x = _image()
    for mode in ("train", "eval"):
        model.train(mode == "train")
        out = model(x)
        for t, net in independent.items():
            net.train(mode == "train")
            torch.testing.assert_close(out[t], net(x))


@pytest.mark.parametrize("channel_wise", [False, True])
def test_cross_stitch_unit_is_eq_1(channel_wise):
    torch.manual_seed(1)
    model = polytask.archs.create(
        "cross_stitch",
        tasks=["a", "b"],
        stages=[nn.Conv2d(4, 4, 1, bias=False)],
        heads=nn.Identity(),
        channel_wise=channel_wise,
        channels=[4],
    )
    unit = model.units["0"]
    with torch.no_grad():
        for t in ("a", "b"):
            unit.rows[t].uniform_(-1, 1)
    x = _image(channels=4)
    xa, xb = model.columns["a"][0](x), model.columns["b"][0](x)
    out = model(x)
    for t in ("a", "b"):
        alpha = unit.rows[t][0]  # [2] or [2, C]
        if channel_wise:
            expected = alpha[0].view(1, 4, 1, 1) * xa + alpha[1].view(1, 4, 1, 1) * xb
        else:
            expected = alpha[0] * xa + alpha[1] * xb
        torch.testing.assert_close(out[t], expected)


def test_cross_stitch_default_init_and_parameter_groups():
    model = polytask.archs.create(
        "cross_stitch", tasks=["a", "b", "c"], stages=_linear_column(), heads=nn.Identity()
    )
    expected = torch.full((3, 3), 0.1).fill_diagonal_(0.9)
    for unit in model.units.values():
        torch.testing.assert_close(unit.matrix(), expected)
    assert {id(p) for p in model.stitch_parameters()} == {
        id(p) for u in model.units.values() for p in u.parameters()
    }
    # Only the last unit's row of a task is that task's own.
    own = {id(p) for p in model.task_parameters("b")}
    assert id(model.units["1"].rows["b"]) in own and id(model.units["0"].rows["b"]) not in own


def test_cross_stitch_stitch_after_subset_leaves_later_stages_to_the_task():
    model = polytask.archs.create(
        "cross_stitch",
        tasks=["a", "b"],
        stages=_linear_column(depth=3),
        heads=nn.Identity(),
        stitch_after=[0],
    )
    own = {id(p) for p in model.task_parameters("a")}
    assert all(id(p) in own for s in list(model.columns["a"])[1:] for p in s.parameters())
    assert not any(id(p) in own for p in model.columns["a"][0].parameters())


def test_cross_stitch_stage_and_head_specs():
    # A factory is called once per task (independent initialisations); a Sequential is a
    # list of stages; a dict gives each task its own heads.
    calls = []

    def factory(task):
        calls.append(task)
        return _linear_column()

    model = polytask.archs.create(
        "cross_stitch",
        tasks=["a", "b"],
        stages=factory,
        heads={"a": nn.Conv2d(4, 1, 1), "b": nn.Conv2d(4, 3, 1)},
    )
    assert calls == ["a", "b"]
    assert not torch.equal(model.columns["a"][0].weight, model.columns["b"][0].weight)
    out = model(torch.randn(2, 4, 3, 3))
    assert out["a"].shape[1] == 1 and out["b"].shape[1] == 3
    seq = polytask.archs.create(
        "cross_stitch", tasks=2, stages=nn.Sequential(*_linear_column()), heads=nn.Identity()
    )
    assert len(seq.columns["task0"]) == 2
    # A list is copied per task: same start, separate parameters.
    assert torch.equal(seq.columns["task0"][0].weight, seq.columns["task1"][0].weight)
    assert seq.columns["task0"][0].weight is not seq.columns["task1"][0].weight


def test_cross_stitch_bad_arguments():
    with pytest.raises(ValueError, match="out of range"):
        polytask.archs.create(
            "cross_stitch", tasks=2, stages=_linear_column(), heads=nn.Identity(), stitch_after=[5]
        )
    with pytest.raises(ValueError, match="cannot infer"):
        polytask.archs.create(
            "cross_stitch", tasks=2, stages=[nn.ReLU()], heads=nn.Identity(), channel_wise=True
        )
    with pytest.raises(ValueError, match="same number"):
        polytask.archs.create(
            "cross_stitch",
            tasks=["a", "b"],
            stages={"a": _linear_column(depth=2), "b": _linear_column(depth=3)},
            heads=nn.Identity(),
        )
    with pytest.raises(TypeError, match="list of stage modules"):
        polytask.archs.create(
            "cross_stitch", tasks=2, stages=nn.Conv2d(4, 4, 1), heads=nn.Identity()
        )
    shared = _linear_column()
    with pytest.raises(ValueError, match="same module object"):
        polytask.archs.create(
            "cross_stitch", tasks=["a", "b"], stages={"a": shared, "b": shared}, heads=nn.Identity()
        )


# --------------------------------------------------------------------------------------
# sluice


def test_sluice_alpha_initialisations():
    balanced = polytask.archs.create(
        "sluice", tasks=3, stages=_linear_column(), heads=nn.Identity()
    )
    torch.testing.assert_close(balanced.alphas()[0], torch.full((6, 6), 1 / 6))
    imbalanced = polytask.archs.create(
        "sluice", tasks=3, stages=_linear_column(), heads=nn.Identity(), alpha_init="imbalanced"
    )
    a = imbalanced.alphas()[1]
    # subspace m of task t reads subspace m of each task: 0.9 own, 0.1/(K-1) = 0.05 others.
    for row in range(6):
        for col in range(6):
            t, m, s, n = row // 2, row % 2, col // 2, col % 2
            want = 0.0 if m != n else (0.9 if t == s else 0.05)
            assert float(a[row, col].detach()) == pytest.approx(want)
    beta = balanced.betas["task0"]
    torch.testing.assert_close(beta, torch.tensor([0.1, 0.9]))  # imbalanced beta, L = 2


def test_sluice_subspace_mixing_and_beta_by_hand():
    torch.manual_seed(2)
    model = polytask.archs.create(
        "sluice",
        tasks=["a", "b"],
        stages=[nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False)],
        heads=nn.Identity(),
    )
    with torch.no_grad():
        for unit in model.units.values():
            for t in ("a", "b"):
                unit.rows[t].uniform_(-1, 1)
        for t in ("a", "b"):
            model.betas[t].copy_(torch.tensor([0.3, -0.7]))
    x = _image(channels=4)

    def mix(alpha, feats):  # alpha [4, 4] over (a,1) (a,2) (b,1) (b,2)
        chunks = [c for t in ("a", "b") for c in feats[t].chunk(2, dim=1)]
        mixed = [sum(alpha[r, j] * chunks[j] for j in range(4)) for r in range(4)]
        return {"a": torch.cat(mixed[:2], 1), "b": torch.cat(mixed[2:], 1)}

    h1 = mix(model.alphas()[0], {t: model.columns[t][0](x) for t in ("a", "b")})
    h2 = mix(model.alphas()[1], {t: model.columns[t][1](h1[t]) for t in ("a", "b")})
    out = model(x)
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], 0.3 * h1[t] - 0.7 * h2[t])


def test_sluice_contains_independent_networks():
    # The paper's point that sluice networks subsume other architectures: alpha = I and beta
    # on the last layer only give K independent networks.
    torch.manual_seed(9)
    stages = {t: [conv(3, 4), conv(4, 4)] for t in ("a", "b")}
    independent = {t: nn.Sequential(*copy.deepcopy(stages[t])).eval() for t in stages}
    model = polytask.archs.create(
        "sluice",
        tasks=["a", "b"],
        stages=stages,
        heads=nn.Identity(),
        alpha_init="imbalanced",
        alpha_self=1.0,
        alpha_other=0.0,
    ).eval()
    torch.testing.assert_close(model.alphas()[0], torch.eye(4))
    with torch.no_grad():
        for t in ("a", "b"):
            model.betas[t].copy_(torch.tensor([0.0, 1.0]))
    x = _image()
    out = model(x)
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], independent[t](x))


def test_sluice_orthogonality_loss():
    model = polytask.archs.create(
        "sluice",
        tasks=["a", "b"],
        stages=[conv(3, 4), conv(4, 4)],
        heads=nn.Identity(),
        orthogonality_weight=0.5,
    )
    expected = 0.0
    for t in ("a", "b"):
        for stage in model.columns[t]:
            w = stage[0].weight.detach().reshape(4, -1)
            expected += 0.5 * float((w[:2] @ w[2:].T).pow(2).sum())
    assert float(model.aux_loss().detach()) == pytest.approx(expected, rel=1e-5)
    # Zero exactly when the subspaces' units are orthogonal.
    with torch.no_grad():
        for t in ("a", "b"):
            for stage in model.columns[t]:
                w = stage[0].weight
                q, _ = torch.linalg.qr(torch.randn(w[0].numel(), 4))
                w.copy_(q.T.reshape(w.shape))
    assert float(model.aux_loss().detach()) == pytest.approx(0.0, abs=1e-10)
    off = polytask.archs.create(
        "sluice", tasks=2, stages=[conv(3, 4)], heads=nn.Identity(), orthogonality_weight=0
    )
    assert off.aux_loss() is None


def test_sluice_bad_arguments():
    with pytest.raises(ValueError, match="no linear/conv layer"):
        polytask.archs.create("sluice", tasks=2, stages=[nn.ReLU()], heads=nn.Identity())
    with pytest.raises(InvalidHyperparameterError, match="subspaces >= 2"):
        polytask.archs.create(
            "sluice", tasks=2, stages=_linear_column(), heads=nn.Identity(), subspaces=1
        )
    model = polytask.archs.create(
        "sluice", tasks=2, stages=[conv(3, 4), conv(4, 6)], heads=nn.Identity()
    )
    with pytest.raises(ValueError, match="beta_layers"):
        model(_image())


# --------------------------------------------------------------------------------------
# NDDR


def test_nddr_layer_initialisation_and_formula():
    layer = NDDRLayer(["a", "b", "c"], 4, alpha=0.9, beta=0.1, momentum=0.05).eval()
    w = layer.reduce["b"][0].weight[:, :, 0, 0]
    eye = torch.eye(4)
    torch.testing.assert_close(w, torch.cat([0.1 * eye, 0.9 * eye, 0.1 * eye], dim=1))
    feats = {t: torch.randn(2, 4, 3, 3) for t in ("a", "b", "c")}
    out = layer(feats)
    eps = layer.reduce["b"][1].eps
    for t in ("a", "b", "c"):
        fused = 0.9 * feats[t] + 0.1 * sum(feats[s] for s in feats if s != t)
        # Fresh BN in eval mode: running mean 0, variance 1.
        torch.testing.assert_close(out[t], torch.relu(fused / (1 + eps) ** 0.5))
    flat = layer({t: f[:, :, 0, 0] for t, f in feats.items()})
    torch.testing.assert_close(flat["a"], out["a"][:, :, 0, 0])


def test_nddr_identity_init_reproduces_independent_networks_in_eval():
    torch.manual_seed(3)
    stages = {t: [conv(3, 4), conv(4, 4)] for t in ("a", "b")}
    independent = {t: nn.Sequential(*copy.deepcopy(stages[t])).eval() for t in stages}
    model = polytask.archs.create(
        "nddr", tasks=["a", "b"], stages=stages, heads=nn.Identity(), alpha=1.0, beta=0.0
    ).eval()
    x = _image()
    out = model(x)
    # Each NDDR layer is ReLU(BN(x_t)) = x_t / sqrt(1 + eps) on post-ReLU features.
    for t in ("a", "b"):
        torch.testing.assert_close(out[t], independent[t](x), rtol=1e-4, atol=1e-5)


def test_nddr_shortcut_reads_every_nddr_output():
    torch.manual_seed(4)
    stages = [conv(3, 4), conv(4, 6, stride=2)]
    short = polytask.archs.create(
        "nddr_shortcut", tasks=["a", "b"], stages=stages, heads=nn.Identity()
    ).eval()
    plain = polytask.archs.create("nddr", tasks=["a", "b"], stages=stages, heads=nn.Identity())
    plain.load_state_dict(short.state_dict(), strict=False)
    plain.eval()
    assert short.shortcut["a"][0].in_channels == 4 + 6
    # A shortcut conv that selects the last NDDR output reproduces plain NDDR-CNN
    # (its output is post-ReLU, and a fresh eval BN only rescales by 1/sqrt(1+eps)).
    with torch.no_grad():
        for t in ("a", "b"):
            w = torch.zeros(6, 10)
            w[:, 4:] = torch.eye(6)
            short.shortcut[t][0].weight.copy_(w[:, :, None, None])
    x = _image()
    a, b = short(x), plain(x)
    for t in ("a", "b"):
        torch.testing.assert_close(a[t], b[t], rtol=1e-4, atol=1e-5)
    # ... and any weight on the first NDDR output changes the result.
    with torch.no_grad():
        short.shortcut["a"][0].weight[:, :4] = 0.5
    assert not torch.allclose(short(x)["a"], b["a"], atol=1e-3)
    assert {id(p) for p in short.nddr_parameters()} >= {id(p) for p in short.shortcut.parameters()}


# --------------------------------------------------------------------------------------
# MTAN


def _mtan_stages():
    return [nn.Sequential(conv(3, 4), conv(4, 4)), nn.Sequential(conv(4, 6, stride=2), conv(6, 6))]


def test_mtan_structure_follows_the_paper():
    model = polytask.archs.create(
        "mtan", tasks=["a", "b"], stages=_mtan_stages(), heads=nn.Identity()
    )
    att0, att1 = model.attention["a"]
    assert att0[0].in_channels == 4 and att0[-2].num_features == 4
    # Later masks read [u_j^b, f(a_{j-1})]: twice the body width.
    assert att1[0].in_channels == 2 * 6 and att1[-2].num_features == 6
    assert isinstance(att1[-1], nn.Sigmoid)
    f = model.refine[0]
    assert f[0].kernel_size == (3, 3) and (f[0].in_channels, f[0].out_channels) == (4, 6)
    own = {id(p) for p in model.task_parameters("a")}
    assert not any(id(p) in own for p in model.refine.parameters())


def test_mtan_masks_multiply_the_shared_features():
    torch.manual_seed(5)
    model = polytask.archs.create(
        "mtan", tasks=["a", "b"], stages=_mtan_stages(), heads=nn.Identity()
    ).eval()
    x = _image()
    b0 = model.bodies[0](x)
    u0 = model.lasts[0](b0)
    b1 = model.bodies[1](u0)
    u1 = model.lasts[1](b1)
    att = model.attention["b"]
    a0 = att[0](b0) * u0
    prev = torch.nn.functional.max_pool2d(model.refine[0](a0), 2)
    a1 = att[1](torch.cat([b1, prev], 1)) * u1
    torch.testing.assert_close(model(x, task="b"), a1)
    # Masks saturated at 1 give back the shared network's output.
    with torch.no_grad():
        for t in ("a", "b"):
            for g in model.attention[t]:
                g[-2].bias.fill_(50.0)
    torch.testing.assert_close(model(x)["a"], u1)


# --------------------------------------------------------------------------------------
# modulation and PS-MCNN


def test_modulation_scales_channels_per_task():
    torch.manual_seed(6)
    model = polytask.archs.create(
        "modulation", tasks=["a", "b"], stages=_linear_column(), heads=nn.Identity()
    )
    x = _image(channels=4)
    shared = model.stages[1](model.stages[0](x))
    torch.testing.assert_close(model(x, task="a"), shared)  # ones at the start
    with torch.no_grad():
        model.modulation["a"]["0"].copy_(torch.tensor([1.0, 0.0, 2.0, -1.0]))
        model.modulation["a"]["1"].copy_(torch.tensor([0.5, 1.0, 1.0, 3.0]))
    w0 = torch.tensor([1.0, 0.0, 2.0, -1.0]).view(1, 4, 1, 1)
    w1 = torch.tensor([0.5, 1.0, 1.0, 3.0]).view(1, 4, 1, 1)
    expected = model.stages[1](model.stages[0](x) * w0) * w1
    out = model(x)
    torch.testing.assert_close(out["a"], expected)
    torch.testing.assert_close(out["b"], shared)


def test_ps_mcnn_wiring():
    model = polytask.archs.create(
        "ps_mcnn",
        tasks=["a", "b", "c"],
        in_channels=3,
        task_channels=[2, 3, 5],
        shared_channels=[4, 6, 7],
        heads=nn.Identity(),
    )
    assert [s[0].in_channels for s in model.tsnets["a"]] == [3, 2 + 4, 3 + 6]
    assert [s[0].in_channels for s in model.snet] == [3, 4 + 3 * 2, 6 + 3 * 3]
    out = model(_image(size=8))
    assert out["b"].shape == (2, 5 + 7, 1, 1)
    # Partial sharing: an early stage of b's TSNet reaches a through the shared network,
    # b's last stage does not.
    x = _image(size=8)
    model.eval()
    before = model(x)["a"]
    with torch.no_grad():
        for p in model.tsnets["b"][-1].parameters():
            p.add_(1.0)
    torch.testing.assert_close(model(x)["a"], before)
    with torch.no_grad():
        for p in model.tsnets["b"][0].parameters():
            p.add_(1.0)
    assert not torch.allclose(model(x)["a"], before)
    with pytest.raises(ValueError, match="one width per stage"):
        polytask.archs.create(
            "ps_mcnn",
            tasks=2,
            in_channels=3,
            task_channels=[2],
            shared_channels=[4, 4],
            heads=nn.Identity(),
        )


# --------------------------------------------------------------------------------------
# LibMTL 1.1.5 references


@pytest.fixture
def libmtl(monkeypatch):
    """Load LibMTL's architecture modules by path, without its package ``__init__`` (which
    needs torchvision); ``LibMTL.model.resnet`` only needs ``torchvision.models.utils``'s
    weight downloader, which is stubbed (no weights are downloaded here)."""
    root = libmtl_root()

    def package(name: str, path: Path | None) -> None:
        monkeypatch.setitem(sys.modules, name, bare_package(name, path))

    def load(name: str, path: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        return mod

    package("LibMTL", root)
    package("LibMTL.architecture", root / "architecture")
    package("LibMTL.model", root / "model")
    package("torchvision", None)
    package("torchvision.models", None)
    utils = types.ModuleType("torchvision.models.utils")
    utils.load_state_dict_from_url = None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision.models.utils", utils)
    load("LibMTL.model.resnet", root / "model" / "resnet.py")
    load("LibMTL.architecture.abstract_arch", root / "architecture" / "abstract_arch.py")
    return types.SimpleNamespace(
        Cross_stitch=load(
            "LibMTL.architecture.Cross_stitch", root / "architecture" / "Cross_stitch.py"
        ).Cross_stitch,
        MTAN=load("LibMTL.architecture.MTAN", root / "architecture" / "MTAN.py").MTAN,
    )


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), nn.BatchNorm2d(cout), nn.ReLU())


class _TinyResNet(nn.Module):
    """What LibMTL's ResNet-only architectures read: conv1/bn1/relu/maxpool, layer1-4 (each
    a Sequential of blocks) and feature_dim."""

    def __init__(self, widths=(4, 4, 4, 4), stem=4) -> None:
        super().__init__()
        self.feature_dim = widths[-1]
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        cin = stem
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(_block(cin, w, stride), _block(w, w)))
            cin = w


def test_cross_stitch_matches_libmtl(libmtl):
    # LibMTL's unit is one weight per (stage, source task), the same for every target task
    # (a rank-one alpha, not the paper's per-pair matrix), and it stitches after layers 1-3
    # only. Our per-pair rows set equal, after stages [stem+layer1, layer2, layer3], coincide.
    torch.manual_seed(7)
    tasks = ["a", "b", "c"]
    decoders = nn.ModuleDict({t: nn.Conv2d(4, 2, 1) for t in tasks})
    lib = libmtl.Cross_stitch(tasks, _TinyResNet, decoders, False, False, torch.device("cpu"))
    with torch.no_grad():
        lib.encoder.cross_unit.uniform_(0.2, 1.5)
    enc = lib.encoder
    stages = {
        t: copy.deepcopy(
            [
                nn.Sequential(enc.resnet_conv[t], enc.resnet_layer["0"][k]),
                enc.resnet_layer["1"][k],
                enc.resnet_layer["2"][k],
                enc.resnet_layer["3"][k],
            ]
        )
        for k, t in enumerate(tasks)
    }
    ours = polytask.archs.create(
        "cross_stitch",
        tasks=tasks,
        stages=stages,
        heads={t: copy.deepcopy(decoders[t]) for t in tasks},
        stitch_after=[0, 1, 2],
    )
    with torch.no_grad():
        for i in range(3):
            for t in tasks:
                ours.units[str(i)].rows[t].copy_(enc.cross_unit[i].view(1, 3))
    x = _image(size=16)
    for train in (True, False):
        lib.train(train)
        ours.train(train)
        a, b = lib(x), ours(x)
        for t in tasks:
            torch.testing.assert_close(b[t], a[t], rtol=1e-5, atol=1e-6)
    # Gradients agree too: LibMTL's shared weight gets the sum over our target rows.
    lib.zero_grad()
    ours.zero_grad()
    sum(lib(x)[t].pow(2).sum() for t in tasks).backward()
    sum(ours(x)[t].pow(2).sum() for t in tasks).backward()
    for i in range(3):
        ours_grad = sum(ours.units[str(i)].rows[t].grad[0] for t in tasks)
        torch.testing.assert_close(ours_grad, enc.cross_unit.grad[i], rtol=1e-4, atol=1e-6)


def test_mtan_matches_libmtl(libmtl):
    # LibMTL hard-codes ResNet widths 64/128/256/512 for the attention modules, uses a
    # residual block as f (our `refine`), the stage width as g's hidden width
    # (attention_reduction=1) and max pooling where the next stage is smaller.
    torch.manual_seed(8)
    tasks = ["a", "b"]
    decoders = nn.ModuleDict({t: nn.Conv2d(512, 2, 1) for t in tasks})

    def encoder():
        return _TinyResNet(widths=(64, 128, 256, 512), stem=64)

    lib = libmtl.MTAN(tasks, encoder, decoders, False, False, torch.device("cpu"))
    enc = lib.encoder
    layers = [enc.shared_layer[str(i)] for i in range(4)]
    stages = copy.deepcopy(
        [
            (nn.Sequential(enc.shared_conv, layers[0][0]), layers[0][1]),
            (layers[1][0], layers[1][1]),
            (layers[2][0], layers[2][1]),
            (layers[3][0], layers[3][1]),
        ]
    )
    blocks = iter(copy.deepcopy(list(enc.encoder_block_att)))
    ours = polytask.archs.create(
        "mtan",
        tasks=tasks,
        stages=stages,
        heads={t: copy.deepcopy(decoders[t]) for t in tasks},
        refine=lambda cin, cout: next(blocks),
        channels=[(64, 64), (128, 128), (256, 256), (512, 512)],
    )
    for k, t in enumerate(tasks):
        for i in range(4):
            ours.attention[t][i].load_state_dict(enc.encoder_att[str(i)][k].state_dict())
    x = _image(size=16)
    for train in (True, False):
        lib.train(train)
        ours.train(train)
        a, b = lib(x), ours(x)
        for t in tasks:
            torch.testing.assert_close(b[t], a[t], rtol=1e-5, atol=1e-6)
    # (eval only: another train-mode forward would move our BN running statistics.)
    torch.testing.assert_close(ours(x, task="b"), a["b"], rtol=1e-5, atol=1e-6)
