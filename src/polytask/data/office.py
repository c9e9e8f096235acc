"""Office-31 and Office-Home: object classification in several domains, one task per domain.

The data: Saenko, Kulis, Fritz & Darrell, "Adapting Visual Category Models to New Domains",
ECCV 2010 (Office-31: Amazon, DSLR, Webcam; 31 classes; 4,110 images) and Venkateswara,
Eusebio, Chakraborty & Panchanathan, "Deep Hashing Network for Unsupervised Domain
Adaptation", CVPR 2017 (Office-Home: Art, Clipart, Product, Real World; 65 classes; 15,588
images). As multi-input MTL (each domain a task with its own images and classifier): Lin &
Zhang, LibMTL (JMLR 2023), ``examples/office``, whose protocol is encoded here:

* images resized to 224 x 224 and normalised with ImageNet's mean and standard deviation;
* a ResNet-18 (ImageNet-pretrained there; see the departure below), global average pooling
  and a shared hidden layer Linear(512, 512)-BN-ReLU-Dropout(0.5), then one Linear(512,
  classes) per domain; cross-entropy; accuracy;
* Adam, lr 1e-4, weight decay 1e-5 (LibMTL's defaults), batch size 64, 100 epochs, no
  schedule;
* per domain and per class, 60% of the images for training, 20% for validation and the rest
  for testing (LibMTL's ``data_txt`` lists hold int(0.6 n), int(0.2 n) and the rest of
  each class's n images). Their draw is not reproducible from a seed, so by default the
  split here is drawn per class with ``data_seed`` in the same proportions; pass
  ``split_files=<LibMTL>/examples/office/data_txt/<dataset>`` to use LibMTL's own lists
  (lines ``<domain>/.../<class>/<file> <label>``, paths relative to ``root``).

Layout: ``root/<domain>/<class>/<image>``; for Office-31 also the release's
``root/<domain>/images/<class>/<image>``; Office-Home's "Real World" folder may be named
``Real World`` (the release) or ``Real_World`` (LibMTL). Class labels are the index of the
class in the sorted list of the data set's classes (:data:`CLASSES`), the same in every
domain.

Items: :func:`load_office` gives one Dataset per domain and split, with items ``(image,
{domain: 0-d int64 label})``. A :class:`~polytask.data.benchmark.Benchmark` trains through
one data set, so the registered benchmarks ``office31`` and ``office_home`` concatenate the
domains (:class:`MultiInputUnion`): an item carries its own domain's label and -1 (missing,
:mod:`polytask.tasks.losses`) for the other domains, each head is trained on its own
domain's images, and the trainer tells the method which tasks a batch holds (``present``).
Departure: LibMTL draws one batch per domain at every step; here a batch mixes the domains
in proportion to their sizes (for LibMTL's schedule, feed :func:`load_office`'s per-domain
sets to :class:`polytask.data.scheduling.MultiTaskLoader`). The backbone starts from random
weights unless ``weights=`` names a torchvision ResNet-18 ``state_dict`` file (no download
here).

Get Office-31 from its project page (https://faculty.cc.gatech.edu/~judy/domainadapt/,
"Office" data set, ``domain_adaptation_images.tar.gz``) and Office-Home from
https://www.hemanthdv.org/officeHomeDataset.html (``OfficeHomeDataset_10072016``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polytask.data._files import check_root, require
from polytask.data._images import IMAGENET_MEAN, IMAGENET_STD, read_image
from polytask.data.benchmark import Benchmark, Recipe, options_of, register
from polytask.errors import DataFormatError, DataNotFoundError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = [
    "CLASSES",
    "DOMAINS",
    "SOURCES",
    "MultiInputUnion",
    "OfficeDomain",
    "load_office",
    "model",
    "tasks",
]

DOMAINS: dict[str, tuple[str, ...]] = {
    "office-31": ("amazon", "dslr", "webcam"),
    "office-home": ("Art", "Clipart", "Product", "Real_World"),
}
CLASSES: dict[str, tuple[str, ...]] = {
    "office-31": tuple(
        sorted(
            "back_pack bike bike_helmet bookcase bottle calculator desk_chair desk_lamp "
            "desktop_computer file_cabinet headphones keyboard laptop_computer letter_tray "
            "mobile_phone monitor mouse mug paper_notebook pen phone printer projector punchers "
            "ring_binder ruler scissors speaker stapler tape_dispenser trash_can".split()
        )
    ),
    "office-home": tuple(
        sorted(
            "Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles "
            "Chair Clipboards Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan "
            "File_Cabinet Flipflops Flowers Folder Fork Glasses Hammer Helmet Kettle Keyboard "
            "Knives Lamp_Shade Laptop Marker Monitor Mop Mouse Mug Notebook Oven Pan Paper_Clip "
            "Pen Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler Scissors "
            "Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table Telephone ToothBrush "
            "Toys Trash_Can Webcam".split()
        )
    ),
}
SOURCES = {
    "office-31": (
        "Get Office-31 from its project page https://faculty.cc.gatech.edu/~judy/domainadapt/ "
        "(domain_adaptation_images.tar.gz) and unpack it so that <root>/amazon/images/"
        "back_pack/ (or <root>/amazon/back_pack/) exists."
    ),
    "office-home": (
        "Get Office-Home from its project page https://www.hemanthdv.org/officeHomeDataset.html"
        " (OfficeHomeDataset_10072016) and use that folder as the root, so that "
        "<root>/Art/Alarm_Clock/ exists."
    ),
}
SIZE = (224, 224)
FRACTIONS = (0.6, 0.2)  # train, val; the rest is test
_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _domain_folder(base: Path, dataset: str, domain: str) -> Path:
    """The folder holding the domain's class folders."""
    names = [domain] + (["Real World"] if domain == "Real_World" else [])
    for name in names:
        for folder in (base / name / "images", base / name):
            if (folder / CLASSES[dataset][0]).is_dir():
                return folder
    tried = " or ".join(str(base / n) for n in names)
    raise DataNotFoundError(
        f"{dataset}: the domain folder {tried} (with one folder per class, e.g. "
        f"{CLASSES[dataset][0]}/) is missing. {SOURCES[dataset]}"
    )


def _scan(folder: Path, dataset: str) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), checked to be the data set's classes."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    missing = [c for c in CLASSES[dataset] if c not in found]
    if missing:
        raise DataNotFoundError(
            f"{dataset}: {folder} lacks the class folder(s) {missing}. {SOURCES[dataset]}"
        )
    out = {}
    for c in CLASSES[dataset]:
        files = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in _SUFFIXES)
        if not files:
            raise DataNotFoundError(f"{dataset}: {folder / c} holds no image. {SOURCES[dataset]}")
        out[c] = files
    return out


def _random_split(
    by_class: dict[str, list[Path]], seed: Sequence[int]
) -> dict[str, list[tuple[Path, str]]]:
    """Per class: int(0.6 n) train, int(0.2 n) val, the rest test, drawn with ``seed``."""
    rng = np.random.default_rng(list(seed))
    out: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "test": []}
    for c, files in by_class.items():
        order = rng.permutation(len(files))
        n_train, n_val = (int(f * len(files)) for f in FRACTIONS)
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
        cuts["test"] = order[n_train + n_val :]
        for split, idx in cuts.items():
            out[split] += [(files[i], c) for i in sorted(idx)]
    return out


def _listed_split(
    base: Path, split_dir: Path, dataset: str, domain: str
) -> dict[str, list[tuple[Path, str]]]:
    """LibMTL's lists ``<split_dir>/<domain>_<split>.txt``: one ``<path> <label>`` a line."""
    out: dict[str, list[tuple[Path, str]]] = {}
    for split in ("train", "val", "test"):
        listing = require(split_dir / f"{domain}_{split}.txt", dataset, SOURCES[dataset])
        rows = []
        for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            relative = line.rsplit(" ", 1)[0]
            c = Path(relative).parent.name
            if c not in CLASSES[dataset]:
                raise DataFormatError(
                    f"{listing}, line {number}: {relative!r} is not in a {dataset} class folder"
                )
            path = base / relative
            if not path.exists() and domain == "Real_World":
                path = base / relative.replace("Real_World", "Real World", 1)
            rows.append((path, c))
        if rows and not rows[0][0].is_file():
            raise DataNotFoundError(
                f"{dataset}: {rows[0][0]}, the first image of {listing}, is missing; the lists' "
                f"paths are relative to the root. {SOURCES[dataset]}"
            )
        out[split] = rows
    return out


class OfficeDomain(Dataset):
    """One domain's split: items ``(image [3, H, W], {domain: 0-d int64 label})``."""

    def __init__(
        self,
        dataset: str,
        domain: str,
        samples: Sequence[tuple[Path, str]],
        size: tuple[int, int] = SIZE,
    ) -> None:
        self.dataset, self.domain, self.size = dataset, domain, size
        index = {c: k for k, c in enumerate(CLASSES[dataset])}
        self.files = [p for p, _ in samples]
        self.labels = torch.tensor([index[c] for _, c in samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = read_image(
            self.files[i],
            self.size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            name=self.dataset,
            source=SOURCES[self.dataset],
        )
        return image, {self.domain: self.labels[i]}


def load_office(
    root: str | Path | None,
    dataset: str = "office-31",
    *,
    data_seed: int = 0,
    split_files: str | Path | None = None,
    image_size: tuple[int, int] = SIZE,
) -> dict[str, dict[str, OfficeDomain]]:
    """``{split: {domain: Dataset}}`` for ``dataset`` ("office-31" or "office-home") under
    ``root``: LibMTL's 60/20/20 per-class split, drawn with ``data_seed`` or read from
    LibMTL's ``split_files`` folder (see the module docstring)."""
    if dataset not in DOMAINS:
        raise ValueError(f"dataset={dataset!r} must be one of {sorted(DOMAINS)}")
    base = check_root(root, dataset, SOURCES[dataset])
    size = (int(image_size[0]), int(image_size[1]))
    out: dict[str, dict[str, OfficeDomain]] = {"train": {}, "val": {}, "test": {}}
    for k, domain in enumerate(DOMAINS[dataset]):
        if split_files is None:
            by_class = _scan(_domain_folder(base, dataset, domain), dataset)
            samples = _random_split(by_class, (int(data_seed), k))
        else:
            samples = _listed_split(base, Path(split_files), dataset, domain)
        for split, rows in samples.items():
            out[split][domain] = OfficeDomain(dataset, domain, rows, size)
    return out


class MultiInputUnion(Dataset):
    """The per-task data sets of a multi-input problem as one: item j of task t is
    ``(inputs, {t: its label} | {other task: -1})`` (missing labels of the other tasks)."""

    def __init__(self, datasets: dict[str, Dataset], missing: int = -1) -> None:
        self.tasks = list(datasets)
        self.datasets = datasets
        self.missing = missing
        self.ends = np.cumsum([len(d) for d in datasets.values()]).tolist()

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.ends else 0

    def __getitem__(self, i: int) -> tuple[Any, dict[str, Tensor]]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        k = bisect.bisect_right(self.ends, i)
        start = self.ends[k - 1] if k else 0
        task = self.tasks[k]
        inputs, target = self.datasets[task][i - start]
        label = target[task]
        targets = {
            t: label if t == task else torch.full_like(label, self.missing) for t in self.tasks
        }
        return inputs, targets


def tasks(dataset: str = "office-31") -> TaskSet:
    """One task per domain: cross-entropy over the data set's classes, accuracy."""
    n = len(CLASSES[dataset])
    return TaskSet(
        [Task(d, losses.cross_entropy, [lambda n=n: metrics.Accuracy(n)]) for d in DOMAINS[dataset]]
    )


class _OfficeEncoder(nn.Sequential):
    """LibMTL's office encoder: a ResNet, global average pooling, Linear(C, hidden) with
    weights N(0, 0.005^2) and bias 0.1, BN, ReLU, Dropout(0.5)."""

    def __init__(self, backbone: str, hidden: int, weights: str | Path | None) -> None:
        from polytask.archs import backbones

        resnet = backbones.create(backbone, global_pool=True)
        if weights is not None:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
            resnet.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        linear = nn.Linear(resnet.out_channels, hidden)
        nn.init.normal_(linear.weight, 0.0, 0.005)
        nn.init.constant_(linear.bias, 0.1)
        super().__init__(resnet, linear, nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.5))
        self.out_features = hidden


def model(
    arch: str,
    task_names: Sequence[str],
    *,
    dataset: str = "office-31",
    backbone: str = "resnet18",
    hidden: int = 512,
    weights: str | Path | None = None,
) -> nn.Module:
    """``"hard_sharing"``: LibMTL's office network (see the module docstring)."""
    from polytask import archs

    if arch != "hard_sharing":
        raise ValueError(f"unknown architecture {arch!r} for {dataset}; it has ['hard_sharing']")
    names = list(task_names)
    unknown = [t for t in names if t not in DOMAINS[dataset]]
    if unknown:
        raise ValueError(
            f"unknown {dataset} domain(s) {unknown}; the domains are {DOMAINS[dataset]}"
        )
    encoder = _OfficeEncoder(backbone, hidden, weights)
    heads = {t: nn.Linear(hidden, len(CLASSES[dataset])) for t in names}
    return archs.create("hard_sharing", tasks=names, encoder=encoder, heads=heads)


def _benchmark(name: str, dataset: str, summary: str) -> Benchmark:
    def load(seed: int = 0, root: str | None = None, **options: Any) -> dict[str, Dataset]:
        del seed  # the split depends on data_seed (or LibMTL's lists) only
        splits = load_office(root, dataset, **options)
        return {split: MultiInputUnion(dict(sets)) for split, sets in splits.items()}

    def build(arch: str, task_names: Sequence[str]) -> nn.Module:
        return model(arch, task_names, dataset=dataset)

    return register(
        Benchmark(
            name=name,
            summary=summary,
            source=(
                "Saenko et al., ECCV 2010 / Venkateswara et al., CVPR 2017 (data); Lin & Zhang, "
                "LibMTL, JMLR 2023, examples/office (multi-input setting, network, recipe)"
            ),
            tasks=lambda: tasks(dataset),
            load=load,
            options=options_of(load_office, exclude=("dataset",)),
            model=build,
            archs=("hard_sharing",),
            recipe=Recipe(
                epochs=100,
                batch_size=64,
                eval_batch_size=64,
                optimizer="adam",
                lr=1e-4,
                weight_decay=1e-5,
                select="delta_m",
            ),
            needs_root=True,
        )
    )


BENCHMARK_31 = _benchmark(
    "office31", "office-31", "Office-31: 31-class classification in 3 domains (multi-input)"
)
BENCHMARK_HOME = _benchmark(
    "office_home", "office-home", "Office-Home: 65-class classification in 4 domains (multi-input)"
)
