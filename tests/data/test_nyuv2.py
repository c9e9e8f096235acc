"""NYUv2 loader (MTAN's .npy layout), MTAN's augmentation, the benchmarks and one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import polytask
from polytask.data import _augment, _dense_models, nyuv2
from polytask.data import benchmark as benchmarks
from polytask.errors import DataFormatError, DataNotFoundError
from polytask.tasks.losses import has_labels

from ._scenes import write_scenes

H, W = nyuv2.SIZE


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("nyuv2")
    write_scenes(path, "train", 5, nyuv2.SIZE, 13, normals=True, seed=0)
    write_scenes(path, "val", 2, nyuv2.SIZE, 13, normals=True, seed=1)
    return path


def test_item_shapes_dtypes_and_ranges(root):
    splits = nyuv2.load_nyuv2(root)
    image, targets = splits["test"][0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert set(targets) == set(nyuv2.TASKS)
    seg, depth, normal = targets["segmentation"], targets["depth"], targets["normal"]
    assert seg.shape == (H, W) and seg.dtype == torch.int64
    assert int(seg.min()) >= -1 and int(seg.max()) <= 12 and bool((seg == -1).any())
    assert depth.shape == (1, H, W) and depth.dtype == torch.float32
    assert normal.shape == (3, H, W) and normal.dtype == torch.float32
    # The file's HWC arrays, channels first, unchanged.
    raw = np.load(root / "val" / "normal" / "0.npy")
    assert torch.equal(normal, torch.from_numpy(raw).permute(2, 0, 1))
    for task in nyuv2.tasks():
        assert has_labels(targets[task.name][None], kind=task.label_kind)


def test_split_sizes_and_deterministic_holdout(root):
    a = nyuv2.load_nyuv2(root, val_fraction=0.2, data_seed=0)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (4, 1, 2)
    assert sorted(a["train"].indices + a["val"].indices) == list(range(5))
    b = nyuv2.load_nyuv2(root, val_fraction=0.2, data_seed=0)
    assert a["val"].indices == b["val"].indices
    held = {
        tuple(nyuv2.load_nyuv2(root, val_fraction=0.2, data_seed=s)["val"].indices)
        for s in range(6)
    }
    assert len(held) > 1  # the hold-out depends on data_seed
    with pytest.raises(TypeError, match="augment='yes'"):
        nyuv2.load_nyuv2(root, augment="yes")
    with pytest.raises(ValueError, match=r"val_fraction=1\.0"):
        nyuv2.load_nyuv2(root, val_fraction=1.0)
    papers = nyuv2.load_nyuv2(root, val_fraction=0.0)
    assert len(papers["train"]) == 5 and papers["val"] is papers["test"]


def test_missing_data_names_the_path_and_the_source(root, tmp_path):
    with pytest.raises(DataNotFoundError, match="lorenmt/mtan"):
        nyuv2.load_nyuv2(None)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nowhere")):
        nyuv2.load_nyuv2(tmp_path / "nowhere")
    write_scenes(tmp_path, "train", 3, (4, 4), 13, normals=True)
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"train/depth/1\.npy.*lorenmt/mtan"):
        nyuv2.load_nyuv2(tmp_path)
    (tmp_path / "train" / "depth").rename(tmp_path / "train" / "gone")
    with pytest.raises(DataNotFoundError, match=r"train/depth is missing"):
        nyuv2.load_nyuv2(tmp_path)


def test_wrong_shape_and_bad_labels_are_format_errors(tmp_path):
    write_scenes(tmp_path, "train", 2, (8, 8), 13, normals=True)
    write_scenes(tmp_path, "val", 2, (8, 8), 13, normals=True)
    with pytest.raises(DataFormatError, match=r"shape \(8, 8, 3\), expected \(288, 384, 3\)"):
        nyuv2.load_nyuv2(tmp_path)["train"][0]


def test_label_out_of_range_is_a_format_error(root, tmp_path):
    splits = nyuv2.load_nyuv2(root, val_fraction=0.0)
    bad = np.full((H, W), 13.0, dtype=np.float32)
    target = splits["test"].folder / "label" / "1.npy"
    original = np.load(target)
    try:
        np.save(target, bad)
        with pytest.raises(DataFormatError, match=r"labels in \[13, 13\]"):
            splits["test"][1]
    finally:
        np.save(target, original)


def test_flip_mirrors_every_map_and_negates_normal_x():
    gen = torch.Generator().manual_seed(0)
    image, label = torch.rand(3, 6, 8), torch.randint(-1, 13, (6, 8))
    depth, normal = torch.rand(1, 6, 8), torch.randn(3, 6, 8)
    flips = 0
    for _ in range(20):
        out = _augment.random_flip(image, label, depth, normal, generator=gen)
        if torch.equal(out[0], image):
            assert all(torch.equal(a, b) for a, b in zip(out[1:], (label, depth, normal)))
            continue
        flips += 1
        assert torch.equal(out[0], image.flip(-1)) and torch.equal(out[1], label.flip(-1))
        assert torch.equal(out[2], depth.flip(-1))
        assert torch.equal(out[3][0], -normal[0].flip(-1))
        assert torch.equal(out[3][1:], normal[1:].flip(-1))
    assert 0 < flips < 20


def test_scale_crop_keeps_size_labels_and_divides_depth_by_the_scale():
    gen = torch.Generator().manual_seed(0)
    image, label = torch.rand(3, 12, 16), torch.randint(-1, 13, (12, 16))
    depth, normal = torch.full((1, 12, 16), 3.0), torch.randn(3, 12, 16)
    scales = set()
    for _ in range(30):
        img, lab, dep, nor = _augment.random_scale_crop(image, label, depth, normal, generator=gen)
        assert img.shape == image.shape and lab.shape == label.shape and nor.shape == normal.shape
        assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= set(range(-1, 13))
        values = dep.unique()
        assert values.numel() == 1
        scales.add(round(3.0 / float(values), 6))
    assert scales == {1.0, 1.2, 1.5}
    # Scale 1 crops the whole map: the identity.
    out = _augment.random_scale_crop(image, label, depth, normal, scales=(1.0,), generator=gen)
    assert torch.allclose(out[0], image) and torch.equal(out[1], label)


def test_augmented_training_split(root):
    torch.manual_seed(0)
    splits = nyuv2.load_nyuv2(root, augment=True, val_fraction=0.2)
    image, targets = splits["train"][0]
    assert image.shape == (3, H, W) and targets["segmentation"].dtype == torch.int64
    assert not splits["val"].augment and not splits["test"].augment


def test_benchmarks_are_registered_with_their_recipes():
    bench = benchmarks.get("nyuv2")
    assert bench.needs_root and bench.archs == ("deeplab", "segnet")
    r = bench.recipe
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.scheduler, r.step_size, r.gamma) == (
        200,
        8,
        1e-4,
        1e-5,
        "step",
        100,
        0.5,
    )
    segnet = benchmarks.get("nyuv2_segnet")
    assert segnet.recipe.batch_size == 2 and segnet.recipe.weight_decay == 0.0
    assert bench.tasks().names == list(nyuv2.TASKS)
    with pytest.raises(DataNotFoundError):
        bench.load(root=None)


@pytest.mark.parametrize("arch, options", [("segnet", {"filters": (4, 8)})])
def test_one_training_step(root, arch, options):
    torch.manual_seed(0)
    splits = nyuv2.load_nyuv2(root, val_fraction=0.0)
    items = [splits["train"][i] for i in range(2)]
    x = torch.stack([i[0] for i in items])
    y = {t: torch.stack([i[1][t] for i in items]) for t in nyuv2.TASKS}
    net = nyuv2.model(arch, nyuv2.TASKS, **options)
    out = net(x)
    assert out["segmentation"].shape == (2, 13, H, W) and out["normal"].shape == (2, 3, H, W)
    losses = torch.stack(nyuv2.tasks().losses(out, y))
    assert bool(torch.isfinite(losses).all())
    method = polytask.methods.create("ew", 3)
    method.backward(losses, shared_params=list(net.shared_parameters()))
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_deeplab_head_is_libmtls():
    # LibMTL's examples/nyu/aspp.py DeepLabHead(2048, 13) has 16,128,781 parameters (its
    # state_dict loads into ours: same names, same shapes).
    head = _dense_models.DeepLabHead(2048, 13)
    assert sum(p.numel() for p in head.parameters()) == 16_128_781
    names = {k for k in head.state_dict() if "convs.4" in k}
    assert "0.convs.4.1.weight" in names  # LibMTL/torchvision's ASPPPooling layout


def test_segnet_model_is_mtans_split_segnet():
    # MTAN's / CAGrad's model_segnet_split.py (type "standard") has 25,055,188 parameters,
    # 3 of them the log-variances of uncertainty weighting, which belong to the method here.
    net = nyuv2.model("segnet", nyuv2.TASKS)
    assert sum(p.numel() for p in net.parameters()) == 25_055_188 - 3


def test_deeplab_model_shapes_on_a_small_input():
    # The ASPP network with a small ResNet: outputs come back at the input's size.
    net = nyuv2.model("deeplab", ["segmentation", "depth"], backbone="resnet18", width=8)
    out = net(torch.rand(2, 3, 32, 48))
    assert out["segmentation"].shape == (2, 13, 32, 48) and out["depth"].shape == (2, 1, 32, 48)
    with pytest.raises(ValueError, match="unknown task"):
        nyuv2.model("segnet", ["edges"])
