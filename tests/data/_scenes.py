"""Tiny fixtures in MTAN's preprocessed ``.npy`` layout (NYUv2, Cityscapes) for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_scenes(
    root: Path,
    split: str,
    n: int,
    size: tuple[int, int],
    num_classes: int,
    *,
    label_field: str = "label",
    normals: bool = False,
    seed: int = 0,
) -> None:
    """``n`` random samples under ``root/split``: images in [0, 1], labels in
    [-1, num_classes) (float, as MTAN stores them), depth with zeros (not measured), unit
    normals with zero vectors (unlabelled)."""
    rng = np.random.default_rng(seed)
    h, w = size
    fields = ["image", label_field, "depth"] + (["normal"] if normals else [])
    for field in fields:
        (root / split / field).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.random((h, w, 3), dtype=np.float32)
        label = rng.integers(-1, num_classes, (h, w)).astype(np.float32)
        depth = (rng.random((h, w, 1), dtype=np.float32) * 5).astype(np.float32)
        depth[: h // 4] = 0.0
        np.save(root / split / "image" / f"{i}.npy", image)
        np.save(root / split / label_field / f"{i}.npy", label)
        np.save(root / split / "depth" / f"{i}.npy", depth)
        if normals:
            normal = rng.standard_normal((h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[:, : w // 4] = 0.0
            np.save(root / split / "normal" / f"{i}.npy", normal)
