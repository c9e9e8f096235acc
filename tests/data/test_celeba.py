"""CelebA loader (official annotation files and aligned JPEGs), the benchmark and one step."""

from __future__ import annotations

import pytest
import torch

import polytask
from polytask.data import benchmark as benchmarks
from polytask.data import celeba
from polytask.errors import DataFormatError, DataNotFoundError

Image = pytest.importorskip("PIL.Image")

#: (file, partition, colour, the attributes that are 1)
ROWS = [
    ("000001.jpg", 0, (255, 0, 0), {"Smiling", "Young"}),
    ("000002.jpg", 0, (0, 255, 0), {"Male"}),
    ("000003.jpg", 1, (0, 0, 255), set()),
    ("000004.jpg", 2, (128, 128, 128), set(celeba.ATTRIBUTES)),
]


def write_celeba(root, *, official: bool = True, rows=ROWS) -> None:
    anno = root / "Anno" if official else root
    evals = root / "Eval" if official else root
    images = root / "Img" / "img_align_celeba" if official else root / "img_align_celeba"
    for folder in (anno, evals, images):
        folder.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows)), " ".join(celeba.ATTRIBUTES) + " "]
    for name, _, _, on in rows:
        values = ["1" if a in on else "-1" for a in celeba.ATTRIBUTES]
        lines.append(name + "  " + " ".join(f"{v:>2}" for v in values))
    (anno / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (evals / "list_eval_partition.txt").write_text(
        "".join(f"{name} {part}\n" for name, part, _, _ in rows)
    )
    for name, _, colour, _ in rows:
        Image.new("RGB", (178, 218), colour).save(images / name, quality=100)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("celeba")
    write_celeba(path)
    return path


def test_splits_items_and_labels(root):
    splits = celeba.load_celeba(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    image, targets = splits["train"][0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    # A plain red JPEG resized stays (nearly) plain red in [0, 1].
    assert abs(float(image[0].mean()) - 1.0) < 0.02 and float(image[1:].abs().max()) < 0.03
    assert list(targets) == list(celeba.ATTRIBUTES)
    assert all(t.dtype == torch.float32 and t.shape == () for t in targets.values())
    on = {a for a, v in targets.items() if float(v) == 1.0}
    assert on == {"Smiling", "Young"}
    assert all(float(v) in (0.0, 1.0) for v in targets.values())
    assert float(sum(splits["test"][0][1].values())) == 40.0
    again = celeba.load_celeba(root)
    assert again["val"].files == splits["val"].files == ["000003.jpg"]


def test_flat_layout(tmp_path):
    write_celeba(tmp_path, official=False)
    assert len(celeba.load_celeba(tmp_path)["train"]) == 2


def test_missing_files_name_the_path_and_the_source(root, tmp_path):
    with pytest.raises(DataNotFoundError, match=r"mmlab\.ie\.cuhk\.edu\.hk"):
        celeba.load_celeba(None)
    write_celeba(tmp_path)
    (tmp_path / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"Eval/list_eval_partition\.txt is missing"):
        celeba.load_celeba(tmp_path)
    write_celeba(tmp_path)
    (tmp_path / "Img" / "img_align_celeba" / "000002.jpg").unlink()
    data = celeba.load_celeba(tmp_path)["train"]
    with pytest.raises(DataNotFoundError, match=r"000002\.jpg is missing.*CelebA"):
        data[1]


def test_bad_annotation_files(tmp_path):
    write_celeba(tmp_path)
    attr = tmp_path / "Anno" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join(["5", *lines[1:]]) + "\n")
    with pytest.raises(DataFormatError, match="announces 5 rows, found 4"):
        celeba.load_celeba(tmp_path)
    attr.write_text("\n".join([*lines[:3], lines[3].replace("-1", "0", 1), *lines[4:]]) + "\n")
    with pytest.raises(DataFormatError, match=r"line 4: expected a file name and 40 values"):
        celeba.load_celeba(tmp_path)


def test_benchmark_and_one_training_step(root):
    bench = benchmarks.get("celeba")
    r = bench.recipe
    assert (r.epochs, r.batch_size, r.optimizer, r.lr) == (15, 256, "adam", 3e-4)
    task_set = bench.tasks()
    assert len(task_set) == 40 and task_set.names == list(celeba.ATTRIBUTES)
    torch.manual_seed(0)
    data = celeba.load_celeba(root)["train"]
    items = [data[i] for i in range(2)]
    x = torch.stack([i[0] for i in items])
    y = {t: torch.stack([i[1][t] for i in items]) for t in celeba.ATTRIBUTES}
    net = celeba.model("cnn", celeba.ATTRIBUTES, width=4)
    out = net(x)
    assert out["Male"].shape == (2, 1)
    losses = torch.stack(task_set.losses(out, y))
    polytask.methods.create("ew", 40).backward(losses, shared_params=list(net.shared_parameters()))
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    # FAMO's shared_base (experiments/celeba/models.py) has 5,176,640 parameters; ours is
    # the same network (its state_dict loads into ours and gives the same outputs).
    assert sum(p.numel() for p in celeba.CelebaCNN().parameters()) == 5_176_640
