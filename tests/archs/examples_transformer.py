"""Tiny examples of the transformer architectures for the shared architecture suite."""

from __future__ import annotations

import torch

from polytask.archs.transformer_ca_mtl import CAMTL
from polytask.archs.transformer_hypergrid import HyperGrid
from polytask.archs.transformer_mt_dnn import MTDNN
from polytask.archs.transformer_polyhistor import Polyhistor
from polytask.archs.transformer_task_prompter import TaskPrompter

from ._examples import Example, example

TOKENS = torch.randint(0, 11, (3, 6))


@example("mt_dnn")
def _() -> Example:
    model = MTDNN(
        ["nli", "sts", "qnli"],
        hidden_size=8,
        num_heads=2,
        num_layers=1,
        vocab_size=11,
        task_types=["classification", "regression", "ranking"],
        num_classes=[3, 1, 1],
    )
    return Example(model, TOKENS)


@example("ca_mtl")
def _() -> Example:
    return Example(
        CAMTL(2, d_model=8, num_heads=2, num_layers=2, max_len=8, num_blocks=2, vocab_size=11),
        TOKENS,
    )


@example("hypergrid")
def _() -> Example:
    return Example(HyperGrid(2, d_model=8, num_heads=2, num_layers=1, vocab_size=11), TOKENS)


@example("polyhistor")
def _() -> Example:
    model = Polyhistor(["seg", "depth"], channels=(4, 8), task_dim=4, reduction=2, rank=2)
    return Example(model, torch.randn(2, 3, 8, 8))


@example("task_prompter")
def _() -> Example:
    model = TaskPrompter(
        ["seg", "depth"], image_size=(4, 4), patch_size=2, embed_dim=8, depth=2, num_heads=2
    )
    # The last block's updated prompts are never read (the readout uses the affinities the
    # block computed from its input prompts), so its prompt-only projection gets no gradient;
    # the same holds in the official code.
    unreached = {"blocks.1.attn.to_channels.weight", "blocks.1.attn.to_channels.bias"}
    return Example(model, torch.randn(2, 3, 4, 4), unreached)
