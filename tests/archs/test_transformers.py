"""Paper-specific checks of the transformer architectures (MT-DNN, CA-MTL, HyperGrid,
Polyhistor, TaskPrompter), on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytask.archs.transformer_ca_mtl import (
    CAMTL,
    ConditionalAttention,
    ConditionalBlockDiagonal,
    ConditionalLayerNorm,
)
from polytask.archs.transformer_hypergrid import GridGate, HyperGrid
from polytask.archs.transformer_mt_dnn import MTDNN, listwise_ranking_loss
from polytask.archs.transformer_polyhistor import (
    DecomposedHyperNetwork,
    Polyhistor,
    ScaledAdapter,
)
from polytask.archs.transformer_task_prompter import PromptAttention, TaskPrompter
from polytask.errors import InvalidHyperparameterError, PolytaskError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


# -- MT-DNN --------------------------------------------------------------------------------


def test_mt_dnn_pools_the_first_token_of_the_users_encoder():
    model = MTDNN(["a"], encoder=nn.Identity(), hidden_size=4).eval()
    x = torch.randn(2, 3, 4)
    dense = model.pooler.dense
    expected = torch.tanh(x[:, 0] @ dense.weight.T + dense.bias)
    torch.testing.assert_close(model.encode(x), expected)


def test_mt_dnn_output_layer_per_task_type():
    types = {"sst": "classification", "sts": "regression", "qnli": "ranking"}
    model = MTDNN(
        list(types),
        encoder=nn.Identity(),
        hidden_size=4,
        task_types=types,
        num_classes={"sst": 3, "sts": 1, "qnli": 1},
    ).eval()
    x = torch.randn(5, 2, 4)
    out, pooled = model(x), model.encode(x)
    assert out["sst"].shape == (5, 3)
    lin = model.heads["sts"].out
    torch.testing.assert_close(out["sts"], (pooled @ lin.weight.T + lin.bias).squeeze(-1))
    lin = model.heads["qnli"].out
    rel = torch.sigmoid((pooled @ lin.weight.T + lin.bias).squeeze(-1))
    torch.testing.assert_close(out["qnli"], rel)
    assert bool(((rel > 0) & (rel < 1)).all())


def test_listwise_ranking_loss_is_the_papers_softmax_over_candidates():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.7, 0.3]])
    positive = torch.tensor([0, 2])
    gamma = 2.0

    def nll(row, i):
        return -math.log(math.exp(gamma * row[i]) / sum(math.exp(gamma * s) for s in row))

    expected = (nll([0.9, 0.1, 0.5], 0) + nll([0.2, 0.7, 0.3], 2)) / 2
    assert listwise_ranking_loss(scores, positive, gamma).item() == pytest.approx(expected)


def test_mt_dnn_rejects_unknown_task_type_and_wrong_width():
    with pytest.raises(InvalidHyperparameterError, match="'tagging'"):
        MTDNN(["a"], task_types="tagging")
    model = MTDNN(["a"], encoder=nn.Identity(), hidden_size=4)
    with pytest.raises(PolytaskError, match=r"\[batch, length, 4\]"):
        model(torch.randn(2, 3, 5))


# -- CA-MTL --------------------------------------------------------------------------------


def test_ca_mtl_attention_bias_is_film_modulated_block_diagonal():
    cbd = ConditionalBlockDiagonal(cond_dim=2, max_len=4, num_blocks=2)
    with torch.no_grad():
        cbd.weight.copy_(torch.arange(8.0).view(4, 2))
        cbd.film.proj.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]]))
    z = torch.tensor([0.5, -1.0])
    gamma, beta = torch.tensor([0.5, -1.0]), torch.tensor([-0.5, 0.0])
    a = (1 + gamma) * torch.arange(8.0).view(4, 2) + beta  # rows 0-1 block 1, rows 2-3 block 2
    expected = torch.zeros(4, 4)
    expected[:2, :2], expected[2:, 2:] = a[:2], a[2:]
    torch.testing.assert_close(cbd(z, 4), expected)
    torch.testing.assert_close(cbd(z, 3), expected[:3, :3])
    with pytest.raises(PolytaskError, match="max_len=4"):
        cbd(z, 5)
    with pytest.raises(InvalidHyperparameterError, match="num_blocks=3"):
        ConditionalBlockDiagonal(2, 4, 3)


def test_ca_mtl_attention_without_bias_is_plain_attention():
    attn = ConditionalAttention(d_model=4, num_heads=2, max_len=8, num_blocks=2, dropout=0.0)
    h, z = torch.randn(2, 5, 4), torch.randn(4)
    q, k, v = attn.qkv(h).view(2, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)
    plain = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 4)
    # A = 0 at initialisation, so M(z) = beta(z) along every row: a constant per key column.
    with torch.no_grad():
        attn.bias.film.proj.weight.zero_()
    torch.testing.assert_close(attn(h, z), plain)
    with torch.no_grad():
        attn.bias.weight.normal_()
        attn.bias.film.proj.weight.normal_()
    bias = attn.bias(z, 5)
    scores = q @ k.transpose(-2, -1) / math.sqrt(2) + bias
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 4)
    torch.testing.assert_close(attn(h, z), expected)


def test_ca_mtl_conditional_layer_norm_modulates_the_scale():
    cln = ConditionalLayerNorm(d_model=3, cond_dim=2)
    with torch.no_grad():
        cln.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        cln.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        cln.film.proj.weight.copy_(torch.eye(6, 2))
    x, z = torch.randn(4, 3), torch.tensor([0.5, -0.5])
    gamma, beta = torch.tensor([0.5, -0.5, 0.0]), torch.zeros(3)
    scale = (1 + gamma) * torch.tensor([1.0, 2.0, 3.0]) + beta
    x_hat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + cln.eps
    )
    torch.testing.assert_close(cln(x, z), x_hat * scale + cln.bias)


def test_ca_mtl_layer_layout_follows_the_official_base_encoder():
    model = CAMTL(2, d_model=8, num_heads=2, num_layers=4, max_len=8, num_blocks=2)
    assert [layer.conditional_norm for layer in model.layers] == [False, False, True, True]
    assert [layer.adapter is not None for layer in model.layers] == [False, False, False, True]


def test_ca_mtl_tasks_differ_only_through_their_embedding():
    model = CAMTL(["a", "b"], d_model=8, num_heads=2, num_layers=2, max_len=8, num_blocks=2)
    model.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        model.heads["b"].load_state_dict(model.heads["a"].state_dict())
        out = model(x)
        assert not torch.allclose(out["a"], out["b"])
        model.task_embeddings["b"].copy_(model.task_embeddings["a"])
        out = model(x)
    torch.testing.assert_close(out["a"], out["b"])


# -- HyperGrid -----------------------------------------------------------------------------


def test_hypergrid_gate_is_the_expanded_outer_product():
    gate = GridGate(task_dim=2, out_features=4, in_features=6, grid=(2, 3), mode="lg")
    with torch.no_grad():
        gate.rows.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        gate.rows.bias.zero_()
        gate.cols.copy_(torch.tensor([1.0, -1.0, 0.5]))
    z = torch.tensor([0.3, -0.4])
    r, c = torch.tensor([0.3, -0.8]), torch.tensor([1.0, -1.0, 0.5])
    grid = torch.sigmoid(torch.outer(r, c))
    g = gate(z)
    assert g.shape == (4, 6)
    for i in range(4):
        for j in range(6):
            assert g[i, j].item() == pytest.approx(grid[i // 2, j // 2].item())


def test_hypergrid_gates_the_ffn_output_weight():
    model = HyperGrid(
        ["a"], d_model=4, num_heads=1, num_layers=1, dim_feedforward=8, grid=(2, 2), dropout=0.0
    ).eval()
    layer, z = model.layers[0], model.task_embeddings["a"]
    h = torch.randn(2, 3, 4)
    a = layer.norm1(h)
    h1 = h + layer.attention(a, a, a)[0]
    u = torch.relu(layer.ffn_in(layer.norm2(h1)))
    expected = h1 + u @ (layer.ffn_out.weight * layer.gate(z)).T + layer.ffn_out.bias
    torch.testing.assert_close(layer(h, z), expected)


def test_hypergrid_global_only_mode_is_not_task_conditioned():
    model = HyperGrid(["a", "b"], d_model=8, num_heads=2, num_layers=1, mode="gg").eval()
    assert len(model.task_embeddings) == 0
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(model.hidden_states(x, "a"), model.hidden_states(x, "b"))
    lg = HyperGrid(["a", "b"], d_model=8, num_heads=2, num_layers=1).eval()
    assert not torch.allclose(lg.hidden_states(x, "a"), lg.hidden_states(x, "b"))


def test_hypergrid_rejects_a_grid_that_does_not_divide_the_weight():
    with pytest.raises(InvalidHyperparameterError, match=r"grid=\(3, 4\)"):
        HyperGrid(2, d_model=8, num_heads=2, grid=(3, 4))
    with pytest.raises(InvalidHyperparameterError, match="'xy'"):
        HyperGrid(2, d_model=8, num_heads=2, mode="xy")


# -- Polyhistor ----------------------------------------------------------------------------


def test_polyhistor_decomposed_hypernetwork_generates_a_low_rank_template():
    hyper = DecomposedHyperNetwork(task_dim=2, rows=3, cols=4, rank=1)
    with torch.no_grad():
        hyper.left.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
        hyper.left.bias.zero_()
        hyper.right.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [0, 1], [0, 0]]))
        hyper.right.bias.fill_(1.0)
    z = torch.tensor([2.0, 3.0])
    a, b = torch.tensor([2.0, 3.0, 5.0]), torch.tensor([3.0, 5.0, 4.0, 1.0])
    torch.testing.assert_close(hyper(z), torch.outer(a, b))


def test_polyhistor_scaling_kernel_is_a_kronecker_product():
    adapter = ScaledAdapter(scale=2)
    with torch.no_grad():
        adapter.down_kernel.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    down_t, up_t = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0], [0.5]])  # c0 = 2, r0 = 1
    down, up = adapter.weights(down_t, up_t)
    expected_down = torch.tensor([[1.0, -1.0, 2.0, -2.0], [3.0, -3.0, 4.0, -4.0]])
    torch.testing.assert_close(down, expected_down)
    # the up kernel starts at 1/s = 0.5 everywhere
    torch.testing.assert_close(up, torch.tensor([[1.0, 1.0], [0.25, 0.25]]).repeat(2, 1))
    x = torch.randn(3, 4, 2, 2)
    h = F.gelu(torch.einsum("rc,bchw->brhw", expected_down, x))
    torch.testing.assert_close(adapter(x, down_t, up_t), x + torch.einsum("cr,brhw->bchw", up, h))


def test_polyhistor_freezes_a_given_backbone_and_trains_only_the_adapters():
    stages = [nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 1)]
    model = Polyhistor(2, stages=stages, channels=(4, 8), task_dim=4, reduction=2, rank=2)
    assert not any(p.requires_grad for p in model.stages.parameters())
    default = Polyhistor(2, channels=(4, 8), task_dim=4, reduction=2, rank=2)
    assert all(p.requires_grad for p in default.stages.parameters())
    # the adapters' own parameters grow with the stages only through the s x s kernels
    assert [a.down_kernel.shape for a in model.adapters] == [(1, 1), (2, 2)]
    with pytest.raises(InvalidHyperparameterError, match="template_channels=3"):
        Polyhistor(2, stages=stages, channels=(4, 8), template_channels=3, reduction=1)


def test_polyhistor_task_embedding_changes_the_adapted_features():
    model = Polyhistor(["a", "b"], channels=(4, 8), task_dim=4, reduction=2, rank=2).eval()
    x = torch.randn(2, 3, 8, 8)
    fa, fb = model.features(x, "a"), model.features(x, "b")
    assert not torch.allclose(fa[-1], fb[-1])
    with torch.no_grad():
        model.task_embeddings["b"].copy_(model.task_embeddings["a"])
    torch.testing.assert_close(model.features(x, "b")[-1], fa[-1])


# -- TaskPrompter --------------------------------------------------------------------------


def test_task_prompter_affinities_match_a_direct_computation():
    attn = PromptAttention(dim=4, num_heads=2, resolution=(4, 4), windows=4, dropout=0.0)
    x, prompts = torch.randn(2, 16, 4), torch.randn(2, 3, 4)
    _, _, spatial, channel = attn(x, prompts)
    q, k, _ = attn.qkv(torch.cat([prompts, x], 1)).view(2, 19, 3, 2, 2).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(spatial, q @ k.transpose(-2, -1))
    positions = attn.to_positions(prompts).view(2, 3, 4, 4)  # [B, T, H, W]
    fmap = x.transpose(1, 2).reshape(2, 4, 4, 4)  # [B, C, H, W]
    for i in range(2):
        for j in range(2):
            p = positions[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 3, 4)
            f = fmap[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 4, 4)
            torch.testing.assert_close(channel[..., i, j], p @ f.transpose(1, 2))


def test_task_prompter_prompts_reach_every_task_so_they_are_shared():
    model = TaskPrompter(["a", "b"], image_size=(4, 4), embed_dim=8, depth=2, num_heads=2)
    model.eval()
    out = model(torch.randn(2, 3, 4, 4))
    (grad,) = torch.autograd.grad(out["b"].sum(), model.prompts)
    assert bool(grad[0].abs().sum() > 0)  # task a's prompt moves task b's output
    shared = _ids(model.shared_parameters())
    assert id(model.prompts) in shared
    assert _ids(model.readouts.parameters()) <= shared  # cross-task reasoning mixes them
    assert _ids(model.cross[0]["a"].parameters()) <= _ids(model.task_parameters("a"))


def test_task_prompter_without_cross_task_reasoning_owns_its_readouts():
    model = TaskPrompter(
        ["a", "b"], image_size=(4, 4), embed_dim=8, depth=2, num_heads=2, cross_task=False
    )
    model.check_partition()
    assert _ids(model.readouts[1]["b"].parameters()) <= _ids(model.task_parameters("b"))
    assert model.select_layers == (1,)
    with pytest.raises(PolytaskError, match=r"\[B, C, 4, 4\]"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(InvalidHyperparameterError, match="windows=2"):
        TaskPrompter(2, image_size=(4, 4), windows=2)
