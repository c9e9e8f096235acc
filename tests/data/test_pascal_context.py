"""PASCAL-Context in Vandenhende et al.'s layout, on a tiny fixture written in the real
formats (jpg, png, .mat)."""

import math

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import torch
from PIL import Image

import polytask
from polytask.data import benchmark as benchmarks
from polytask.data import pascal_context as pc
from polytask.errors import DataFormatError, DataNotFoundError

H, W = 10, 12
TRAIN, VAL = ["2008_000001", "2008_000002", "2008_000003"], ["2008_000010", "2008_000011"]
VALID, INVALID = 4, 2  # full-scene classes: "ceiling" has distilled normals, 2 has not
assert VALID in pc.NORMALS_VALID_CLASSES and INVALID not in pc.NORMALS_VALID_CLASSES


def _anno(objects):
    """PASCAL-Part's ``anno`` struct: imname, then objects (class, class_ind, mask, parts)."""
    odt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objs = np.zeros((1, len(objects)), dtype=odt)
    for i, (name, ind, mask, parts) in enumerate(objects):
        if parts:
            arr = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
            for j, (part_name, part_mask) in enumerate(parts):
                arr[0, j] = (part_name, part_mask.astype(np.uint8))
        else:
            arr = np.zeros((0, 0))
        objs[0, i] = (name, np.array([[ind]]), mask.astype(np.uint8), arr)
    return {"anno": {"imname": "x", "objects": objs}}


def _box(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def _write(root, image_id, k):
    rng = np.random.default_rng(k)
    for folder in ("JPEGImages", "semseg/pascal-context", "semseg/VOC12", "pascal-context/trainval",
                   "human_parts", "normals_distill", "sal_distill"):  # fmt: skip
        (root / folder).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
    semseg = np.zeros((H, W), dtype=np.uint8)
    semseg[2:6, 3:8] = 15
    semseg[0, 0] = 255
    folder = "VOC12" if k == 0 else "pascal-context"
    Image.fromarray(semseg).save(root / "semseg" / folder / f"{image_id}.png")
    labels = np.full((H, W), INVALID, dtype=np.uint16)
    labels[:, 6:] = VALID
    scipy.io.savemat(root / "pascal-context/trainval" / f"{image_id}.mat", {"LabelMap": labels})
    person = _box(2, 8, 2, 6)
    if k == 0:  # a person with parts
        parts = [
            ("head", _box(2, 4, 2, 6)),
            ("torso", _box(4, 6, 2, 6)),
            ("llarm", _box(6, 8, 2, 3)),
        ]
        objects = [("person", 15, person, parts), ("dog", 12, _box(0, 2, 8, 12), [])]
    elif k == 1:  # no person
        objects = [("dog", 12, _box(0, 2, 8, 12), [])]
    else:  # a person without part annotation
        objects = [("person", 15, person, [])]
    scipy.io.savemat(root / "human_parts" / f"{image_id}.mat", _anno(objects))
    normals = np.zeros((H, W, 3), dtype=np.uint8)
    normals[..., 2] = 255  # n = (-1, -1, 1) before normalisation
    Image.fromarray(normals).save(root / "normals_distill" / f"{image_id}.png")
    sal = np.zeros((H, W), dtype=np.uint8)
    sal[3:7, 3:7] = 200
    sal[0, :] = 100  # below 0.5 * 255: not salient
    Image.fromarray(sal).save(root / "sal_distill" / f"{image_id}.png")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("PASCAL_MT")
    (base / "ImageSets" / "Context").mkdir(parents=True)
    for split, ids in (("train", TRAIN), ("val", VAL)):
        (base / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for k, image_id in enumerate(ids):
            _write(base, image_id, k)
    return base


def test_items_at_native_size(root):
    splits = pc.load_pascal_context(root, val_fraction=0, augment=False, size=(H, W))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    image, t = splits["train"][0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert set(t) == set(pc.TASKS)
    # semseg: int64, 255 -> -1, VOC12's file preferred.
    assert t["semseg"].dtype == torch.int64 and t["semseg"].shape == (H, W)
    assert int(t["semseg"][0, 0]) == -1 and int(t["semseg"][3, 4]) == 15
    assert set(t["semseg"].unique().tolist()) == {-1, 0, 15}
    # human parts: head -> 1, torso -> 2, left lower arm -> 4 (their HUMAN_PART[6]).
    parts = t["human_parts"]
    assert parts.dtype == torch.int64
    assert int(parts[2, 3]) == 1 and int(parts[5, 3]) == 2 and int(parts[7, 2]) == 4
    assert int(parts[0, 0]) == 0 and int(parts.max()) < pc.NUM_PARTS
    # saliency: binary at 0.5.
    assert t["sal"].shape == (1, H, W) and set(t["sal"].unique().tolist()) == {0.0, 1.0}
    assert float(t["sal"][0, 4, 4]) == 1.0 and float(t["sal"][0, 0, 0]) == 0.0
    # normals: unit vectors on the valid class only.
    n = t["normals"]
    assert n.shape == (3, H, W)
    assert bool((n[:, :, :6] == 0).all())
    expected = torch.tensor([-1.0, -1.0, 1.0]) / math.sqrt(3)
    assert torch.allclose(n[:, 0, 8], expected, atol=1e-5)
    # edges: the thinned Laplacian of LabelMap.
    labels = scipy.io.loadmat(root / "pascal-context/trainval" / f"{TRAIN[0]}.mat")["LabelMap"]
    assert torch.equal(t["edge"][0], torch.from_numpy(pc.edges_from_labels(labels)))
    assert float(t["edge"].sum()) > 0


def test_images_without_annotated_persons_ignore_human_parts(root):
    split = pc.load_pascal_context(root, val_fraction=0, augment=False, size=(H, W))["train"]
    assert bool((split[1][1]["human_parts"] == -1).all())  # no person
    assert bool((split[2][1]["human_parts"] == -1).all())  # a person without parts
    assert not polytask.tasks.losses.has_labels(split[1][1]["human_parts"])


def test_resize_to_the_training_size_and_hold_out(root):
    splits = pc.load_pascal_context(root, val_fraction=0.34, augment=False, size=(16, 20))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 2]
    image, t = splits["val"][0]
    assert image.shape == (3, 16, 20) and t["semseg"].shape == (16, 20)
    assert t["normals"].shape == (3, 16, 20) and t["edge"].shape == (1, 16, 20)
    norms = t["normals"].norm(dim=0)
    assert bool(((norms - 1).abs() < 1e-4)[norms > 0].all())  # re-normalised after bicubic


def test_missing_files_name_the_path_and_the_source(root, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"PASCAL_MT\.tgz"):
        pc.load_pascal_context(None)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        pc.load_pascal_context(tmp_path / "nowhere")
    # A copy of the fixture without one normals file.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    missing = copy / "normals_distill" / f"{VAL[1]}.png"
    missing.unlink()
    with pytest.raises(DataNotFoundError, match=r"PASCAL_MT\.tgz") as info:
        pc.load_pascal_context(copy, val_fraction=0)
    assert str(missing) in str(info.value)
    with pytest.raises(DataNotFoundError, match=r"train\.txt"):
        pc.load_pascal_context(copy / "JPEGImages")
    # A label outside the 21 classes is a format error naming the file.
    bad = copy / "semseg" / "VOC12" / f"{TRAIN[0]}.png"
    Image.fromarray(np.full((H, W), 30, dtype=np.uint8)).save(bad)
    split = pc.PascalContext(copy, TRAIN[:1], size=(H, W))
    with pytest.raises(DataFormatError, match="30") as info:
        split[0]
    assert str(bad) in str(info.value)


def test_flip_mirrors_and_negates_normals_x():
    maps = {
        "image": torch.rand(3, 4, 5),
        "semseg": torch.rand(1, 4, 5),
        "normals": torch.rand(3, 4, 5),
    }
    out = pc.flip(maps)
    assert torch.equal(out["semseg"], maps["semseg"].flip(-1))
    assert torch.equal(out["normals"][0], -maps["normals"][0].flip(-1))
    assert torch.equal(out["normals"][1:], maps["normals"][1:].flip(-1))


def test_scale_zooms_about_the_centre_and_pads_with_zeros():
    label = torch.arange(16, dtype=torch.float32).view(1, 4, 4) + 1
    same = pc.scale_rotate({"semseg": label, "image": label.expand(3, 4, 4)}, 0.0, 1.0)
    assert torch.equal(same["semseg"], label)
    assert torch.allclose(same["image"], label.expand(3, 4, 4), atol=1e-5)
    # Scale 2 about the centre (2, 2): output pixel x reads (x - 2) / 2 + 2.
    zoom = pc.scale_rotate({"semseg": label}, 0.0, 2.0)["semseg"][0]
    assert float(zoom[0, 0]) == float(label[0, 1, 1]) and float(zoom[2, 2]) == float(label[0, 2, 2])
    # Scale 1/2: output pixel x reads 2 (x - 2) + 2; x = 0 falls outside: zero, as warpAffine.
    shrink = pc.scale_rotate({"semseg": label}, 0.0, 0.5)["semseg"][0]
    assert float(shrink[0, 0]) == 0.0 and float(shrink[2, 2]) == float(label[0, 2, 2])
    assert float(shrink[1, 1]) == float(label[0, 0, 0])


def test_rotation_is_counter_clockwise_and_turns_the_normals():
    label = torch.zeros(1, 5, 5)
    label[0, 2, 4] = 1.0  # right of the centre (2.5, 2.5)
    out = pc.scale_rotate({"semseg": label}, 90.0, 1.0)["semseg"][0]
    assert float(out[1, 2]) == 1.0 and float(out.sum()) == 1.0  # now above the centre
    # Their ScaleNRotate: phi = atan2(n_x, n_y); n_x = sin(phi + a) r, n_y = cos(phi + a) r.
    g = torch.Generator().manual_seed(0)
    n = torch.randn(3, 2, 2, generator=g)
    angle = 17.0
    phi = torch.atan2(n[0], n[1]) + math.radians(angle)
    r = torch.sqrt(n[0] ** 2 + n[1] ** 2)
    turned = pc.rotate_normals(n, angle)
    assert torch.allclose(turned[0], torch.sin(phi) * r, atol=1e-6)
    assert torch.allclose(turned[1], torch.cos(phi) * r, atol=1e-6)
    assert torch.equal(turned[2], n[2])


def test_augmentation_is_seeded_by_torch(root):
    def item(seed):
        gen = torch.Generator().manual_seed(seed)
        split = pc.PascalContext(root, TRAIN[:1], size=(H, W), augment=True, generator=gen)
        return split[0]

    a, b = item(3), item(3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["normals"], b[1]["normals"])
    assert any(not torch.equal(item(s)[0], a[0]) for s in (4, 5, 6))


def test_laplacian_is_opencvs_with_reflected_borders():
    labels = np.zeros((3, 4), dtype=np.uint16)
    labels[:, 0] = 1
    lap = pc.laplacian(labels)
    # Column 0: reflect-101 reads column 1 on both sides: 0 + 0 + 1 + 1 - 4 = -2.
    assert lap[:, 0].tolist() == [-2.0, -2.0, -2.0]
    assert lap[:, 1].tolist() == [1.0, 1.0, 1.0] and not lap[:, 2:].any()


def test_thin_reproduces_scikit_images_example():
    # skimage.morphology.thin's docstring example.
    square = np.zeros((7, 7), dtype=bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), dtype=bool)
    expected[0, 1] = expected[1, 2] = expected[2, 3] = expected[3, 3] = expected[4, 3] = True
    assert np.array_equal(pc.thin(square), expected)


def test_thin_keeps_thin_lines_and_thins_a_two_pixel_boundary():
    line = np.zeros((5, 7), dtype=bool)
    line[2, 1:6] = True
    assert np.array_equal(pc.thin(line), line)
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[:, 3:] = 2
    edges = pc.edges_from_labels(labels)
    assert (np.abs(pc.laplacian(labels)) > 0).sum(axis=1).tolist() == [2] * 6
    assert edges.sum(axis=1).max() == 1.0 and edges.sum() >= 5


def _reference_thin(image):
    """scikit-image's ``thin``: look-up tables over the neighbourhood code of the mask
    [[8, 4, 2], [16, 0, 1], [32, 64, 128]] (bits: E, NE, N, NW, W, SW, S, SE)."""

    def bits(n):
        return [bool(n >> i & 1) for i in range(8)]

    def g12(n):
        b = bits(n)
        g1 = sum(1 for i in (0, 2, 4, 6) if not b[i] and (b[i + 1] or b[(i + 2) % 8])) == 1
        n1 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[(k + 1) % 8])
        return g1 and min(n1, n2) in (2, 3)

    lut = np.array(
        [
            g12(n) and not ((bits(n)[1] or bits(n)[2] or not bits(n)[7]) and bits(n)[0])
            for n in range(256)
        ]
    )
    lutp = np.array(
        [
            g12(n) and not ((bits(n)[5] or bits(n)[6] or not bits(n)[3]) and bits(n)[4])
            for n in range(256)
        ]
    )
    mask = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)
    skel = image.astype(np.uint8).copy()
    while True:
        before = skel.sum()
        for table in (lut, lutp):
            code = scipy.ndimage.correlate(skel, mask, mode="constant")
            skel[np.take(table, code)] = 0
        if skel.sum() == before:
            return skel.astype(bool)


def test_thin_matches_scikit_images_lookup_tables():
    rng = np.random.default_rng(0)
    for _ in range(5):
        image = scipy.ndimage.binary_dilation(rng.random((24, 24)) > 0.8)
        assert np.array_equal(pc.thin(image), _reference_thin(image))


def test_benchmark_registration_recipe_and_weights():
    bench = benchmarks.get("pascal_context")
    assert bench.needs_root and bench.archs == ("deeplab",)
    r = bench.recipe
    assert (r.optimizer, r.lr, r.weight_decay, r.scheduler, r.poly_power) == (
        "adam",
        1e-4,
        1e-4,
        "poly",
        0.9,
    )
    assert (r.epochs, r.batch_size) == (100, 6)
    assert bench.tasks().names == list(pc.TASKS)
    assert dict(zip(pc.TASKS, pc.LOSS_WEIGHTS)) == {
        "semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0
    }  # fmt: skip
    assert "weights=[1, 2, 5, 10, 50]" in bench.summary
    with pytest.raises(DataNotFoundError):
        bench.load(root=None)


def test_one_training_step_with_their_weights(root):
    torch.manual_seed(0)
    split = pc.load_pascal_context(root, val_fraction=0, size=(32, 32))["train"]
    items = [split[i] for i in range(2)]
    x = torch.stack([i[0] for i in items])
    y = {t: torch.stack([i[1][t] for i in items]) for t in pc.TASKS}
    net = pc.model("deeplab", pc.TASKS, width=8)
    out = net(x)
    assert out["semseg"].shape == (2, 21, 32, 32) and out["human_parts"].shape == (2, 7, 32, 32)
    assert out["normals"].shape == (2, 3, 32, 32) and out["edge"].shape == (2, 1, 32, 32)
    task_set = pc.tasks()
    losses = torch.stack(task_set.losses(out, y))
    assert bool(torch.isfinite(losses).all())
    method = polytask.methods.create("ew", 5, weights=list(pc.LOSS_WEIGHTS))
    method.backward(losses, shared_params=list(net.shared_parameters()))
    grads = [p.grad for p in net.shared_parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    metrics = polytask.tasks.SplitMetrics(task_set)
    metrics.update({k: v.detach() for k, v in out.items()}, y)
    values = metrics.compute()
    assert {
        "semseg/miou",
        "human_parts/miou",
        "sal/max_f",
        "normals/mean_angle",
        "edge/loss",
    } <= set(values)
