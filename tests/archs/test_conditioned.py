"""Paper-specific checks of the task-conditioned architectures: TSN, ASTMT and RCM."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import polytask
from polytask.archs._conditioning import TaskSwitch
from polytask.archs.astmt import ASTMT, AdaptedConv2d, SqueezeExcitation, reverse_gradient
from polytask.archs.rcm import RCM, RCMConv2d, convert_to_rcm
from polytask.archs.task_switching import AdaIN, TaskSwitching
from polytask.errors import PolytaskError

from .examples_conditioned import conv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def image(batch: int = 2, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, dtype=torch.float64)


# -- Task Switching Networks -----------------------------------------------------------------


def tsn(**kw) -> TaskSwitching:
    kw.setdefault("code_width", 2)
    kw.setdefault("mapping_layers", 2)
    return TaskSwitching(
        ["a", "b", "c"],
        encoder=nn.Conv2d(3, 4, 3, padding=1),
        decoder=[nn.Conv2d(4, 5, 3, padding=1)],
        head=nn.Conv2d(5, 3, 1),
        **kw,
    ).double()


def test_tsn_onehot_codes_are_binary_blocks_and_no_parameter_is_a_tasks():
    model = tsn(code_width=3)
    assert model.codes.shape == (3, 9)
    for k, t in enumerate(model.tasks):
        expected = torch.zeros(9, dtype=torch.float64)
        expected[3 * k : 3 * k + 3] = 1
        torch.testing.assert_close(model.task_code(t), expected, rtol=0, atol=0)
        assert list(model.task_parameters(t)) == []
    assert len(list(model.shared_parameters())) == len(list(model.parameters()))
    out = model(image())
    # One network, switched by the code alone: the tasks' outputs differ.
    assert not torch.allclose(out["a"], out["b"]) and not torch.allclose(out["b"], out["c"])


def test_tsn_output_is_a_function_of_the_task_code_alone():
    model = tsn(code="learned")
    model.eval()
    x = image()
    before = model(x)
    with torch.no_grad():
        model.task_codes["b"].add_(torch.randn(6, dtype=torch.float64))
    after = model(x)
    for t in ("a", "c"):  # another task's code does not touch this task's output
        torch.testing.assert_close(after[t], before[t], rtol=0, atol=0)
    assert not torch.allclose(after["b"], before["b"])
    with torch.no_grad():  # task b given a's code becomes task a
        model.task_codes["b"].copy_(model.task_codes["a"])
    torch.testing.assert_close(model(x, task="b"), before["a"], rtol=0, atol=0)


def test_tsn_adain_block_by_hand():
    # No mapping layers: w = pixel_norm(z); the block is conv -> AdaIN -> LeakyReLU(0.01).
    model = tsn(mapping_layers=0)
    x = image()
    z = model.task_code("b")
    w = z / torch.sqrt(z.pow(2).mean() + 1e-8)
    a = model.styles[0]
    style = w @ (a.weight * math.sqrt(2 / w.numel())).T + a.bias
    gamma, beta = style[:5], style[5:]
    h = model.decoder[0][0](model.encoder(x))
    mean = h.mean(dim=(2, 3), keepdim=True)
    var = h.var(dim=(2, 3), unbiased=False, keepdim=True)
    normed = (h - mean) / torch.sqrt(var + 1e-5)
    y = F.leaky_relu(gamma[:, None, None] * normed + beta[:, None, None], 0.01)
    torch.testing.assert_close(model(x, task="b"), model.head(y))


def test_tsn_style_maps_start_at_gamma_one_beta_zero():
    model = tsn()
    bias = model.styles[0].bias
    torch.testing.assert_close(bias[:5], torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(bias[5:], torch.zeros(5, dtype=torch.float64))
    # Equalised learning rate: N(0, 1) weights, scaled by sqrt(2 / fan_in) at run time.
    assert model.styles[0].scale == pytest.approx(math.sqrt(2 / 6))


def test_tsn_channel_pooling_matches_adaptive_avg_pool3d():
    model = tsn(out_channels={"a": 1, "b": 2}).eval()
    x = image()
    full = tsn(out_channels=None).eval()
    full.load_state_dict(model.state_dict())
    for t, c in (("a", 1), ("b", 2)):
        y = full(x, task=t)
        h, w = y.shape[2:]
        official = F.adaptive_avg_pool3d(y.unsqueeze(1), (c, h, w)).squeeze(1)
        torch.testing.assert_close(model(x, task=t), official)
    assert model(x, task="c").shape[1] == 3


def test_tsn_encoder_runs_once_for_all_tasks():
    model = tsn()
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    model(image())
    assert len(calls) == 1


class _UNetDecoder(nn.Module):
    """A decoder with a skip connection and its own AdaIN placement."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(4, 4, 1)
        self.norm_up, self.norm_skip = AdaIN(4), AdaIN(4)

    def forward(self, feats):
        low, high = feats
        up = F.interpolate(self.norm_up(self.up(high)), scale_factor=2.0)
        return up + self.norm_skip(self.skip(low))


class _TwoScaleEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Conv2d(3, 4, 3, padding=1)
        self.high = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        low = self.low(x)
        return low, self.high(low)


def test_tsn_own_decoder_with_adain_layers():
    decoder = _UNetDecoder()
    model = TaskSwitching(2, _TwoScaleEncoder(), decoder, nn.Conv2d(4, 2, 1), code_width=2)
    assert len(model.styles) == 2
    out = model(torch.randn(2, 3, 8, 8))
    assert out["task0"].shape == (2, 2, 8, 8)
    assert decoder.norm_up.style is None  # styles are cleared after each task's pass
    with pytest.raises(PolytaskError, match="AdaIN"):
        decoder(model.encoder(torch.randn(2, 3, 8, 8)))


def test_tsn_argument_errors():
    with pytest.raises(ValueError, match="encoder contains AdaIN"):
        TaskSwitching(
            2, nn.Sequential(nn.Conv2d(3, 4, 1), AdaIN(4)), [nn.Conv2d(4, 4, 1)], nn.Conv2d(4, 1, 1)
        )
    with pytest.raises(ValueError, match="no AdaIN layer"):
        TaskSwitching(2, nn.Identity(), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 1, 1))
    with pytest.raises(ValueError, match="'onehot' or 'learned'"):
        tsn(code="gaussian")
    with pytest.raises(PolytaskError, match="unknown task"):
        tsn(out_channels={"z": 1})
    with pytest.raises(ValueError, match="more than the head"):
        tsn(out_channels={"a": 4})(image())


# -- ASTMT -----------------------------------------------------------------------------------


def astmt(**kw) -> ASTMT:
    return ASTMT(
        ["a", "b", "c"],
        stages=[conv(3, 6), conv(6, 6, stride=2)],
        heads=nn.Conv2d(6, 2, 1),
        reduction=2,
        **kw,
    ).double()


def test_reverse_gradient_is_identity_forward_and_flips_backward():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64)
    y = reverse_gradient(x, 0.3)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    (g,) = torch.autograd.grad((y * c).sum(), x)
    torch.testing.assert_close(g, -0.3 * c)


def test_astmt_reversal_flips_the_discriminator_gradient_reaching_the_backbone():
    model = astmt()
    model.train()
    out = model(image())
    losses = torch.stack([out[t].pow(2).mean() for t in model.tasks])
    backbone = [model.stages[1][0].conv.weight, model.se["b"]["1"].fc[0].weight]
    disc = list(model.discriminator_parameters())
    alpha = 0.4
    adv = model.discriminator_loss(losses, alpha=alpha)
    got = torch.autograd.grad(adv, backbone + disc, retain_graph=True)
    # The same loss by hand, without the reversal layer.
    plain = 0
    for k, t in enumerate(model.tasks):
        f = model._features[t]
        (g,) = torch.autograd.grad(losses[k], f, create_graph=True)
        g = g / (g.norm(dim=1, keepdim=True) + 1e-10)
        logits = model.discriminator(g)
        plain = plain + F.cross_entropy(logits, torch.full((2, 4, 4), k))
    torch.testing.assert_close(adv, plain)
    ref = torch.autograd.grad(plain, backbone + disc)
    for g, r in zip(got[: len(backbone)], ref[: len(backbone)]):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, -alpha * r)
    for g, r in zip(got[len(backbone) :], ref[len(backbone) :]):
        torch.testing.assert_close(g, r)


def test_astmt_discriminator_sees_only_the_gradient_direction():
    # Per-position L2 normalisation: scaling a task's loss leaves the discriminator loss alone.
    model = astmt()
    out = model(image())
    losses = torch.stack([out[t].pow(2).mean() for t in model.tasks])
    scale = torch.tensor([5.0, 1.0, 0.1], dtype=torch.float64)
    a = model.discriminator_loss(losses)
    b = model.discriminator_loss(losses * scale)
    torch.testing.assert_close(a, b)


def test_astmt_valid_mask_restricts_the_positions():
    model = astmt()
    out = model(image())
    losses = {"b": out["b"].pow(2).mean()}
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[1, 2, 3] = True
    got = model.discriminator_loss(losses, valid={"b": valid})
    (g,) = torch.autograd.grad(losses["b"], model._features["b"], create_graph=True)
    g = g / (g.norm(dim=1, keepdim=True) + 1e-10)
    logits = model.discriminator(g)[1, :, 2, 3]
    torch.testing.assert_close(got, F.cross_entropy(logits[None], torch.tensor([1])))


def test_astmt_discriminator_training_step_trains_both_sides():
    # One step of the documented loop: the discriminator and the network both move.
    model = astmt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(image())
    losses = torch.stack([out[t].pow(2).mean() for t in model.tasks])
    adv = model.discriminator_loss(losses, alpha=ASTMT.reversal_alpha(0.5))
    (0.01 * adv).backward(retain_graph=True)
    assert all(p.grad is not None for p in model.discriminator_parameters())
    method = polytask.methods.create("upgrad", 3)
    method.backward(0.99 * losses, shared_params=list(model.shared_parameters()))
    before = copy.deepcopy(model.discriminator.state_dict())
    opt.step()
    assert any(not torch.equal(v, model.discriminator.state_dict()[k]) for k, v in before.items())


def test_astmt_reversal_alpha_schedule():
    assert ASTMT.reversal_alpha(0.0) == 0.0
    assert ASTMT.reversal_alpha(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [ASTMT.reversal_alpha(p / 10) for p in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="progress"):
        ASTMT.reversal_alpha(1.5)


@pytest.mark.parametrize(
    ("kwargs", "view"),
    [
        ({"padding": 1}, lambda x: x),
        ({"padding": 1, "stride": 2}, lambda x: x[..., ::2, ::2]),
        ({"padding": 0}, lambda x: x[..., 1:-1, 1:-1]),
        ({"padding": 3, "dilation": 2}, lambda x: F.pad(x, (1, 1, 1, 1))),
        ({"padding": "same", "dilation": 2}, lambda x: x),
    ],
)
def test_adapter_is_a_centred_parallel_1x1_conv(kwargs, view):
    conv3 = nn.Conv2d(3, 4, 3, **kwargs).double()
    switch = TaskSwitch("test")
    layer = AdaptedConv2d(conv3, ["a", "b"], switch)
    x = image()
    with switch.use("a"):
        torch.testing.assert_close(layer(x), conv3(x), rtol=0, atol=0)  # adapters start at 0
        m = torch.randn(4, 3, dtype=torch.float64)
        with torch.no_grad():
            layer.adapters["a"].weight.copy_(m[:, :, None, None])
        expected = conv3(x) + torch.einsum("oi,bihw->bohw", m, view(x))
        torch.testing.assert_close(layer(x), expected)
    with switch.use("b"):  # the other task's adapter is still zero
        torch.testing.assert_close(layer(x), conv3(x), rtol=0, atol=0)


def test_adapters_cannot_align_with_even_kernels():
    with pytest.raises(ValueError, match="no centre pixel"):
        ASTMT(2, [nn.Conv2d(3, 4, 2)], nn.Conv2d(4, 1, 1), reduction=1)


def test_squeeze_excitation_by_hand():
    se = SqueezeExcitation(6, 3).double()
    x = image(channels=6)
    s = x.mean(dim=(2, 3))
    gate = torch.sigmoid(se.fc[2](torch.relu(se.fc[0](s))))
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def test_astmt_adapts_only_spatial_convs_and_starts_as_the_given_network():
    stages = [conv(3, 6), nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU())]
    plain = copy.deepcopy(stages)
    model = ASTMT(2, stages, nn.Identity(), reduction=2, discriminator=False).double()
    adapted = [m for m in model.modules() if isinstance(m, AdaptedConv2d)]
    assert len(adapted) == 1 and adapted[0].conv.kernel_size == (3, 3)
    with torch.no_grad():
        for se in model.se.values():  # SE gates of 1 make the network the given one
            for block in se.values():
                block.fc[2].weight.zero_()
                block.fc[2].bias.fill_(50.0)
    model.eval()
    x = image()
    ref = nn.Sequential(*plain).double().eval()(x)
    torch.testing.assert_close(model(x, task="task1"), ref)


def test_astmt_copies_after_a_training_forward():
    model = astmt()
    x = image()
    model(x)
    clone = copy.deepcopy(model)  # the recorded features (graph tensors) are not copied
    assert len(model._features) == 3 and len(clone._features) == 0
    for t, y in clone(x).items():
        torch.testing.assert_close(y, model(x, task=t))


def test_astmt_without_se_is_adapters_only():
    model = ASTMT(2, [conv(3, 4)], nn.Identity(), se_after=[], discriminator=False)
    assert not list(model.se.parameters())
    assert [p.shape for p in model.task_parameters("task0")] == [(4, 3, 1, 1)]


def test_astmt_errors():
    model = astmt()
    with pytest.raises(PolytaskError, match="no features"):
        model.discriminator_loss(torch.zeros(3, dtype=torch.float64))
    out = model(image(), task="a")
    with pytest.raises(PolytaskError, match="no features of task 'b'"):
        model.discriminator_loss({"b": out.sum()})
    with pytest.raises(ValueError, match="task order"):
        model.discriminator_loss(out.sum()[None])
    with pytest.raises(PolytaskError, match="discriminator=False"):
        astmt(discriminator=False).discriminator_loss(torch.zeros(3))
    with pytest.raises(ValueError, match="no convolution to adapt"):
        ASTMT(2, [nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))], nn.Identity(), reduction=1)
    with pytest.raises(ValueError, match="no hidden unit"):
        ASTMT(2, [conv(3, 4)], nn.Identity())


# -- RCM -------------------------------------------------------------------------------------


def backbone() -> nn.Sequential:
    # A biased conv, a BN, and a grouped strided conv: every case the reparameterisation meets.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        nn.ReLU(),
    ).double()


def rcm(**kw) -> tuple[RCM, nn.Module]:
    net = backbone()
    with torch.no_grad():  # non-trivial BN statistics, so per-task copies are really copies
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    plain = copy.deepcopy(net).eval()
    model = RCM(["a", "b"], net, nn.Conv2d(6, 2, 1), **kw).double()
    return model, plain


def randomise_modulators(model: RCM) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modulators." in name:
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("nff", [True, False])
def test_rcm_identity_modulators_reproduce_the_backbone_exactly(nff):
    model, plain = rcm(nff=nff)
    model.eval()
    x = image()
    for t in model.tasks:
        with model._switch.use(t):
            torch.testing.assert_close(model.backbone(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("nff", [True, False])
def test_rcm_conv_is_the_modulator_applied_to_the_filter_bank(nff):
    model, _ = rcm(nff=nff)
    randomise_modulators(model)
    x = image(channels=4)
    layer = model.backbone[3]
    assert isinstance(layer, RCMConv2d)
    for t in model.tasks:
        mod = layer.modulators[t]
        if nff:
            v = mod.direction
            wt = mod.gain[:, None] * v / v.norm(dim=1, keepdim=True)
        else:
            wt = mod.weight
        expected = F.conv2d(layer.bank(x), wt[:, :, None, None], groups=2)
        with model._switch.use(t):
            torch.testing.assert_close(layer(x), expected)
    first = model.backbone[0]  # a biased conv: y = W_t (W_s x + b_s) + b_t
    x = image()
    mod = first.modulators["b"]
    expected = F.conv2d(first.bank(x), mod.matrix()[:, :, None, None], mod.bias)
    with model._switch.use("b"):
        torch.testing.assert_close(first(x), expected)


def test_rcm_nff_rows_have_the_gain_as_norm():
    model, _ = rcm()
    randomise_modulators(model)
    mod = model.backbone[0].modulators["a"]
    torch.testing.assert_close(mod.matrix().norm(dim=1), mod.gain.abs())


def test_rcm_no_task_interference():
    model, _ = rcm()
    x = image()
    model.eval()
    before = {t: model(x, task=t).detach() for t in model.tasks}
    state_b = {k: v.clone() for k, v in model.state_dict().items() if ".b." in k or "heads.b" in k}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(3):  # train task a alone, BN statistics included
        opt.zero_grad()
        model(x, task="a").pow(2).mean().backward()
        opt.step()
    model.eval()
    after = {t: model(x, task=t).detach() for t in model.tasks}
    assert not torch.allclose(after["a"], before["a"])
    torch.testing.assert_close(after["b"], before["b"], rtol=0, atol=0)
    for k, v in state_b.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_rcm_joint_training_equals_training_each_task_alone():
    joint, _ = rcm()
    alone = copy.deepcopy(joint)
    x = image()
    out = joint(x)
    sum(out[t].pow(2).mean() for t in joint.tasks).backward()
    alone(x, task="b").pow(2).mean().backward()
    for p, q in zip(joint.task_parameters("b"), alone.task_parameters("b")):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_rcm_shared_filter_bank_is_frozen():
    model, _ = rcm()
    shared = list(model.shared_parameters())
    assert len(shared) == 3 and not any(p.requires_grad for p in shared)  # 2 weights, 1 bias
    with pytest.raises(polytask.errors.EmptyParametersError):
        polytask.methods.create("ew", 2).backward(
            torch.stack([o.sum() for o in model(image()).values()]), shared_params=shared
        )
    trained, _ = rcm(freeze_shared=False)
    assert all(p.requires_grad for p in trained.shared_parameters())


def test_rcm_response_initialization():
    model, _ = rcm()
    randomise_modulators(model)
    model.eval()
    batches = [image(batch=4), image(batch=4)]
    x = image(batch=4)
    before = {t: model(x, task=t) for t in model.tasks}
    model.response_initialization(batches)
    for t in model.tasks:  # every task's composed filters are unchanged
        torch.testing.assert_close(model(x, task=t), before[t])
    # On the same data, each bank's responses are now decorrelated within each group, by
    # decreasing variance (responses taken through task a's path, as RI does by default).
    inputs = {}
    hooks = [
        model.backbone[i].register_forward_hook(lambda m, a, _: inputs.__setitem__(m, a[0]))
        for i in (0, 3)
    ]
    model(torch.cat(batches), task="a")
    for h in hooks:
        h.remove()
    for layer in (model.backbone[0], model.backbone[3]):
        y = layer.bank(inputs[layer]).transpose(0, 1)
        groups = layer.bank.groups
        for block in y.reshape(groups, y.shape[0] // groups, -1):
            cov = torch.cov(block, correction=0)
            off = cov - torch.diag(cov.diagonal())
            assert off.abs().max() < 1e-8 * cov.abs().max()
            assert torch.all(cov.diagonal()[:-1] >= cov.diagonal()[1:])


def test_rcm_conversion_errors_and_tied_convs():
    with pytest.raises(ValueError, match=r"no nn\.Conv2d"):
        RCM(2, nn.Linear(3, 3), nn.Identity())
    model, _ = rcm()
    with pytest.raises(PolytaskError, match="already in RCM form"):
        convert_to_rcm(model.backbone, model.tasks, model._switch)
    with pytest.raises(PolytaskError, match="outside its forward"):
        model.backbone(image())
    shared = nn.Conv2d(3, 3, 3, padding=1)
    tied = RCM(2, nn.Sequential(shared, nn.ReLU(), shared), nn.Identity())
    assert tied.backbone[0] is tied.backbone[2]
