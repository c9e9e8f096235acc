"""Office-31 / Office-Home loaders (folder per domain and class), the LibMTL split, the
multi-input union, the benchmarks and one step."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

import polytask
from polytask.data import benchmark as benchmarks
from polytask.data import office
from polytask.errors import DataNotFoundError
from polytask.tasks.losses import has_labels

Image = pytest.importorskip("PIL.Image")

#: images per class: 7 for the first class, 1 for the others
COUNTS = {0: 7}


def write_office(root, dataset: str, *, release_layout: bool = True) -> None:
    for d, domain in enumerate(office.DOMAINS[dataset]):
        if dataset == "office-31":
            folder = root / domain / "images" if release_layout else root / domain
        else:
            folder = root / ("Real World" if domain == "Real_World" else domain)
        for k, c in enumerate(office.CLASSES[dataset]):
            (folder / c).mkdir(parents=True, exist_ok=True)
            for i in range(COUNTS.get(k, 1)):
                colour = (k * 8 % 256, d * 60, i * 30)
                Image.new("RGB", (12, 10), colour).save(folder / c / f"frame_{i:04d}.jpg")


@pytest.fixture(scope="module")
def root31(tmp_path_factory):
    path = tmp_path_factory.mktemp("office31")
    write_office(path, "office-31")
    return path


def test_per_class_split_sizes_and_determinism(root31):
    splits = office.load_office(root31, "office-31", data_seed=0)
    assert set(splits) == {"train", "val", "test"}
    amazon = {s: splits[s]["amazon"] for s in splits}
    # 7 images of class 0: int(4.2) = 4 train, int(1.4) = 1 val, 2 test; 1 image: test.
    first = {s: int((d.labels == 0).sum()) for s, d in amazon.items()}
    assert first == {"train": 4, "val": 1, "test": 2}
    assert len(amazon["train"]) == 4 and len(amazon["val"]) == 1 and len(amazon["test"]) == 32
    files = [f for d in amazon.values() for f in d.files]
    assert len(files) == len(set(files)) == 7 + 30
    again = office.load_office(root31, "office-31", data_seed=0)
    assert again["val"]["dslr"].files == splits["val"]["dslr"].files
    draws = {
        tuple(office.load_office(root31, data_seed=s)["val"]["amazon"].files) for s in range(5)
    }
    assert len(draws) > 1


def test_items(root31):
    data = office.load_office(root31, "office-31")["train"]["webcam"]
    image, target = data[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert list(target) == ["webcam"] and target["webcam"].dtype == torch.int64
    assert 0 <= int(target["webcam"]) < 31
    # ImageNet normalisation of a plain colour: (value / 255 - mean) / std per channel.
    i = int(data.files[0].stem.split("_")[1])
    colour = torch.tensor([0, 2 * 60, i * 30], dtype=torch.float32) / 255
    expected = (colour - torch.tensor(office.IMAGENET_MEAN)) / torch.tensor(office.IMAGENET_STD)
    assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.05)


def test_libmtl_split_lists(root31, tmp_path):
    lists = tmp_path / "data_txt"
    lists.mkdir()
    for domain in office.DOMAINS["office-31"]:
        for split, cls in (("train", "back_pack"), ("val", "bike"), ("test", "trash_can")):
            line = f"{domain}/images/{cls}/frame_0000.jpg 7\n"
            (lists / f"{domain}_{split}.txt").write_text(line)
    splits = office.load_office(root31, "office-31", split_files=lists)
    assert [len(splits[s]["dslr"]) for s in ("train", "val", "test")] == [1, 1, 1]
    assert int(splits["test"]["dslr"].labels[0]) == office.CLASSES["office-31"].index("trash_can")
    (lists / "webcam_test.txt").write_text("webcam/trash_can/frame_0000.jpg 7\n")
    with pytest.raises(DataNotFoundError, match=r"webcam/trash_can/frame_0000\.jpg.*is missing"):
        office.load_office(root31, "office-31", split_files=lists)
    (lists / "amazon_val.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"amazon_val\.txt is missing"):
        office.load_office(root31, "office-31", split_files=lists)


def test_missing_data_messages(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"gatech\.edu/~judy/domainadapt"):
        office.load_office(tmp_path / "none", "office-31")
    write_office(tmp_path, "office-31", release_layout=False)
    assert len(office.load_office(tmp_path, "office-31")["test"]["amazon"]) == 32
    for f in (tmp_path / "dslr" / "mug").iterdir():
        f.unlink()
    (tmp_path / "dslr" / "mug").rmdir()
    with pytest.raises(DataNotFoundError, match=r"dslr lacks the class folder\(s\) \['mug'\]"):
        office.load_office(tmp_path, "office-31")
    with pytest.raises(ValueError, match="office-31"):
        office.load_office(tmp_path, "office-100")


def test_office_home_real_world_folder(tmp_path):
    write_office(tmp_path, "office-home")
    splits = office.load_office(tmp_path, "office-home", image_size=(16, 16))
    assert set(splits["test"]) == {"Art", "Clipart", "Product", "Real_World"}
    assert len(splits["test"]["Real_World"]) == 65 - 1 + 2  # class 0 has 7 images
    assert "Real World" in str(splits["test"]["Real_World"].files[0])


def test_union_marks_other_domains_missing(root31):
    sets = office.load_office(root31, "office-31", image_size=(16, 16))["test"]
    union = office.MultiInputUnion(dict(sets))
    assert len(union) == sum(len(d) for d in sets.values())
    _, first = union[0]
    _, last = union[len(union) - 1]
    assert int(first["amazon"]) >= 0 and int(first["dslr"]) == -1 == int(first["webcam"])
    assert int(last["webcam"]) >= 0 and int(last["amazon"]) == -1
    with pytest.raises(IndexError):
        union[len(union)]


def test_benchmarks_and_one_training_step(root31):
    bench = benchmarks.get("office31")
    r = bench.recipe
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.scheduler) == (
        100,
        64,
        1e-4,
        1e-5,
        None,
    )
    assert benchmarks.get("office_home").tasks().names == list(office.DOMAINS["office-home"])
    splits = bench.load(root=str(root31), image_size=(32, 32))
    train = splits["train"]
    # One item of each domain: every task is present in the batch.
    starts = [0, *train.ends[:-1]]
    x, y = default_collate([train[i] for i in starts])
    task_set = bench.tasks()
    assert all(has_labels(y[t]) for t in task_set.names)
    torch.manual_seed(0)
    net = bench.model("hard_sharing", task_set.names)
    out = net(x)
    assert out["amazon"].shape == (3, 31)
    losses = torch.stack(task_set.losses(out, y))
    polytask.methods.create("ew", 3).backward(losses, shared_params=list(net.shared_parameters()))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
