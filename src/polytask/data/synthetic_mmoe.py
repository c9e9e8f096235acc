"""The synthetic two-task regression data of MMoE, with a controllable task correlation.

Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, section 3.2: two orthogonal unit vectors u1, u2 in
R^d; w1 = c u1, w2 = c (rho u1 + sqrt(1 - rho^2) u2); x ~ N(0, I_d);
y_k = w_k^T x + sum_{i=1}^{m} sin(alpha_i w_k^T x + beta_i) + eps_k, eps_k ~ N(0, 0.01^2).
The cosine of w1 and w2 is rho, and the Pearson correlation of the labels falls with it.

The paper gives c = 1, m = 10 and the noise, but not the alphas and betas; we use
alpha_i = i, beta_i = (i - 1)^2 (i = 1..m), as Google's reference generator for this procedure
does (google-research, ``dselect_k_moe``). d = 100 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from polytask.data.benchmark import Benchmark, Recipe, register
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = ["SyntheticMMoE", "synthetic_mmoe"]

TASKS = ("y1", "y2")


def synthetic_mmoe(
    num_samples: int,
    *,
    rho: float,
    dim: int = 100,
    c: float = 1.0,
    m: int = 10,
    noise_std: float = 0.01,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Inputs [N, dim] and labels [N, 2] of the MMoE synthetic problem (float32)."""
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho} must be a correlation in [-1, 1]")
    if dim < 2:
        raise ValueError(f"dim={dim} must be at least 2 (two orthogonal task directions)")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be positive")
    rng = np.random.default_rng(seed)
    # Two orthonormal directions from the QR decomposition of a Gaussian matrix.
    q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (rho * u1 + math.sqrt(1.0 - rho**2) * u2)
    x = rng.standard_normal((num_samples, dim))
    alphas = np.arange(1, m + 1, dtype=np.float64)
    betas = np.arange(m, dtype=np.float64) ** 2
    ys = []
    for w in (w1, w2):
        dot = x @ w
        nonlinear = np.sin(np.outer(dot, alphas) + betas).sum(axis=1)
        ys.append(dot + nonlinear + rng.normal(scale=noise_std, size=num_samples))
    return torch.from_numpy(x).float(), torch.from_numpy(np.stack(ys, axis=1)).float()


class SyntheticMMoE(Dataset):
    """A split of the synthetic data; items are ``(x, {"y1": y1, "y2": y2})``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.x[i], {"y1": self.y[i, 0], "y2": self.y[i, 1]}


#: Split sizes: the paper trains on synthetic data of this kind; we hold out 1,000 + 1,000.
SPLITS = {"train": 8000, "val": 1000, "test": 1000}


def load(
    seed: int = 0, root: str | None = None, rho: float = 0.5, **options: object
) -> dict[str, Dataset]:
    """Train/val/test splits of one draw of the problem (the draw depends on ``seed`` only
    through ``data_seed``: the problem is the same for every training seed)."""
    if root is not None:
        raise ValueError("synthetic_mmoe is generated, not read: drop --root")
    unknown = sorted(set(options) - {"data_seed"})
    if unknown:
        raise ValueError(f"unknown synthetic_mmoe option(s) {unknown}; it accepts rho, data_seed")
    data_seed = int(options.get("data_seed", 0))  # type: ignore[arg-type]
    x, y = synthetic_mmoe(sum(SPLITS.values()), rho=rho, seed=data_seed)
    out, start = {}, 0
    for split, n in SPLITS.items():
        out[split] = SyntheticMMoE(x[start : start + n], y[start : start + n])
        start += n
    return out


def tasks() -> TaskSet:
    return TaskSet([Task(t, losses.mse, [lambda: metrics.MeanError("mse")]) for t in TASKS])


def model(arch: str, task_names: Sequence[str]):
    """The MMoE paper's model families with parameter-matched widths: 8 experts of 16 ReLU
    units (MMoE, OMoE) against a 128-unit shared bottom, towers of 8 units."""
    from polytask import archs

    if arch == "shared_bottom":
        return archs.create(
            "shared_bottom", tasks=list(task_names), in_features=100, bottom=[128], tower=[8]
        )
    if arch in ("mmoe", "omoe"):
        return archs.create(
            arch, tasks=list(task_names), in_features=100, num_experts=8, expert=[16], tower=[8]
        )
    raise ValueError(f"unknown architecture {arch!r} for synthetic_mmoe")


BENCHMARK = register(
    Benchmark(
        name="synthetic_mmoe",
        summary="MMoE's synthetic two-task regression with task correlation rho (CPU, seconds)",
        source=(
            "Ma et al., Modeling Task Relationships in Multi-task Learning with Multi-gate "
            "Mixture-of-Experts, KDD 2018, section 3.2"
        ),
        tasks=tasks,
        load=load,
        options=("rho", "data_seed"),
        model=model,
        archs=("shared_bottom", "mmoe", "omoe"),
        recipe=Recipe(epochs=5, batch_size=128, optimizer="adam", lr=1e-3, select="delta_m"),
    )
)
