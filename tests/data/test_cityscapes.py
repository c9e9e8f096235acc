"""Cityscapes loader (MTAN's .npy layout), its label folders, the benchmarks and one step."""

from __future__ import annotations

import pytest
import torch

import polytask
from polytask.data import benchmark as benchmarks
from polytask.data import cityscapes
from polytask.errors import DataNotFoundError

from ._scenes import write_scenes

H, W = cityscapes.SIZE


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("cityscapes")
    write_scenes(path, "train", 4, cityscapes.SIZE, 7, label_field="label_7", seed=0)
    write_scenes(path, "val", 2, cityscapes.SIZE, 7, label_field="label_7", seed=1)
    return path


def test_items_splits_and_determinism(root):
    splits = cityscapes.load_cityscapes(root, val_fraction=0.25, data_seed=3)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (3, 1, 2)
    image, targets = splits["train"][0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert set(targets) == {"segmentation", "depth"}
    seg = targets["segmentation"]
    assert seg.shape == (H, W) and seg.dtype == torch.int64
    assert -1 <= int(seg.min()) and int(seg.max()) <= 6
    assert targets["depth"].shape == (1, H, W)
    again = cityscapes.load_cityscapes(root, val_fraction=0.25, data_seed=3)
    assert again["val"].indices == splits["val"].indices
    assert sorted(splits["train"].indices + splits["val"].indices) == [0, 1, 2, 3]


def test_label_folders(root, tmp_path):
    assert cityscapes.label_field(root / "train", 7) == "label_7"
    write_scenes(tmp_path, "train", 1, (2, 2), 7, label_field="label")
    assert cityscapes.label_field(tmp_path / "train", 7) == "label"  # LibMTL's copy
    with pytest.raises(DataNotFoundError, match=r"label_19 is missing.*lorenmt/mtan"):
        cityscapes.label_field(tmp_path / "train", 19)
    with pytest.raises(ValueError, match="7 or 19"):
        cityscapes.label_field(tmp_path / "train", 13)


def test_missing_files_are_named(tmp_path):
    write_scenes(tmp_path, "train", 2, (4, 4), 7, label_field="label_7")
    with pytest.raises(DataNotFoundError, match=r"val/label_7 is missing.*lorenmt/mtan"):
        cityscapes.load_cityscapes(tmp_path)
    write_scenes(tmp_path, "val", 2, (4, 4), 7, label_field="label_7")
    (tmp_path / "val" / "image" / "1.npy").unlink()
    with pytest.raises(DataNotFoundError, match="different numbers of samples"):
        cityscapes.load_cityscapes(tmp_path)


def test_benchmarks():
    bench = benchmarks.get("cityscapes")
    r = bench.recipe
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.step_size) == (200, 64, 1e-4, 1e-5, 100)
    assert benchmarks.get("cityscapes_segnet").recipe.batch_size == 8
    with pytest.raises(ValueError, match="7-class"):
        bench.load(root="x", num_classes=19)


def test_one_training_step_deeplab(root):
    torch.manual_seed(0)
    data = cityscapes.load_cityscapes(root, val_fraction=0.0)["train"]
    items = [data[i] for i in range(2)]
    x = torch.stack([i[0] for i in items])
    y = {t: torch.stack([i[1][t] for i in items]) for t in cityscapes.TASKS}
    # LibMTL's network scaled down (ResNet-18 backbone, 8-channel ASPP) at the real size.
    net = cityscapes.model("deeplab", cityscapes.TASKS, backbone="resnet18", width=8)
    out = net(x)
    assert out["segmentation"].shape == (2, 7, H, W) and out["depth"].shape == (2, 1, H, W)
    losses = torch.stack(cityscapes.tasks().losses(out, y))
    polytask.methods.create("ew", 2).backward(losses, shared_params=list(net.shared_parameters()))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
