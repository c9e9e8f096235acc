"""AliExpress loader (MTReclib's CSVs), the benchmark and one step of Shared-Bottom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

import polytask
from polytask.data import aliexpress
from polytask.data import benchmark as benchmarks
from polytask.errors import DataFormatError, DataNotFoundError


def write_csv(path, n: int, seed: int, max_id: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, max_id, (n, 16))
    num = rng.random((n, 63)).round(4)
    click = rng.integers(0, 2, n)
    conversion = click * rng.integers(0, 2, n)
    rows = [",".join(aliexpress.COLUMNS)]
    for i in range(n):
        values = [str(1000 + i), *map(str, cat[i]), *map(str, num[i])]
        rows.append(",".join([*values, str(click[i]), str(conversion[i])]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return np.concatenate([cat, num, click[:, None], conversion[:, None]], axis=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("aliexpress")
    write_csv(path / "AliExpress_NL" / "train.csv", 10, 0)
    write_csv(path / "AliExpress_NL" / "test.csv", 4, 1, max_id=6)
    return path


def test_columns_items_and_field_sizes(root):
    raw = write_csv(root / "AliExpress_NL" / "train.csv", 10, 0)  # same content as the fixture
    cat, num, labels = aliexpress.read_csv(root / "AliExpress_NL" / "train.csv")
    assert cat.dtype == np.int64 and cat.shape == (10, 16)
    assert num.dtype == np.float32 and num.shape == (10, 63)
    np.testing.assert_array_equal(cat, raw[:, :16])
    np.testing.assert_allclose(num, raw[:, 16:79], rtol=1e-6)
    np.testing.assert_array_equal(labels, raw[:, 79:])
    splits = aliexpress.load_aliexpress(root, "NL", val_fraction=0.2)
    (c, n), y = splits.train[0]
    assert c.shape == (16,) and n.shape == (63,) and set(y) == {"ctr", "ctcvr"}
    assert all(float(v) in (0.0, 1.0) for v in y.values())
    # Table sizes cover the test file's larger ids too.
    test_cat = aliexpress.read_csv(root / "AliExpress_NL" / "test.csv")[0]
    assert splits.field_dims == tuple(int(v) + 1 for v in np.maximum(cat.max(0), test_cat.max(0)))


def test_splits_are_deterministic(root):
    a = aliexpress.load_aliexpress(root / "AliExpress_NL", "NL", val_fraction=0.2, data_seed=4)
    assert (len(a.train), len(a.val), len(a.test)) == (8, 2, 4)
    b = aliexpress.load_aliexpress(root, "NL", val_fraction=0.2, data_seed=4)
    assert torch.equal(a.val.numerical, b.val.numerical)
    rows = torch.cat([a.train.numerical, a.val.numerical])[:, 0]
    everything = aliexpress.read_csv(root / "AliExpress_NL" / "train.csv")[1][:, 0]
    assert sorted(rows.tolist()) == sorted(everything.tolist())


def test_missing_and_malformed_files(root, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"AliExpress_ES is missing.*easezyc"):
        aliexpress.load_aliexpress(root, "ES")
    write_csv(tmp_path / "AliExpress_US" / "train.csv", 3, 0)
    with pytest.raises(DataNotFoundError, match=r"AliExpress_US/test\.csv is missing"):
        aliexpress.load_aliexpress(tmp_path, "US")
    bad = tmp_path / "bad.csv"
    bad.write_text("search_id,a,b\n1,2,3\n")
    with pytest.raises(DataFormatError, match="header must be MTReclib"):
        aliexpress.read_csv(bad)
    header = ",".join(aliexpress.COLUMNS)
    row = ",".join(["1"] + ["0"] * 16 + ["0.5"] * 63 + ["0", "1"])
    bad.write_text(header + "\n" + row + "\n")
    with pytest.raises(DataFormatError, match="conversion 1 without a click"):
        aliexpress.read_csv(bad)
    with pytest.raises(ValueError, match="country"):
        aliexpress.load_aliexpress(root, "DE")


def test_benchmark_and_one_training_step(root):
    bench = benchmarks.get("aliexpress")
    r = bench.recipe
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay) == (50, 2048, 1e-3, 1e-6)
    assert bench.archs == ("shared_bottom", "mmoe", "omoe")
    splits = bench.load(root=str(root), country="NL")
    torch.manual_seed(0)
    net = bench.model("shared_bottom", list(aliexpress.TASKS))
    x, y = default_collate([splits["train"][i] for i in range(4)])
    out = net(x)
    assert out["ctr"].shape == (4, 1)
    task_set = bench.tasks()
    losses = torch.stack(task_set.losses(out, y))
    polytask.methods.create("ew", 2).backward(losses, shared_params=list(net.shared_parameters()))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    # MTReclib's SharedBottomModel for these table sizes has 1,348,994 parameters (the same
    # layers in the same order: its state_dict copies into ours and gives the same outputs).
    dims = [3, 7, 2, 5, 9, 4, 4, 6, 3, 2, 8, 5, 5, 3, 2, 11]
    reference = aliexpress.model("shared_bottom", list(aliexpress.TASKS), field_dims=dims)
    assert sum(p.numel() for p in reference.parameters()) == 1_348_994
    # and its MMoEModel / OMoEModel (8 experts) 10,116,242 / 10,098,826.
    for arch, size in (("mmoe", 10_116_242), ("omoe", 10_098_826)):
        expert_net = aliexpress.model(arch, list(aliexpress.TASKS), field_dims=dims)
        assert sum(p.numel() for p in expert_net.parameters()) == size
    too_big = (x[0] + 100, x[1])
    mmoe = bench.model("mmoe", list(aliexpress.TASKS))
    features = mmoe.encode(x)
    out = mmoe.decode(features)
    losses = torch.stack(task_set.losses(out, y))
    polytask.methods.create("ew", 2).backward(
        losses, shared_params=list(mmoe.shared_parameters()), features=features, mode="features"
    )
    assert mmoe.embed.embedding.weight.grad is not None  # the input layer is shared
    with pytest.raises(ValueError, match="outside its field's embedding table"):
        net(too_big)
