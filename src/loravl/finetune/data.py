"""Classification data: an image folder, a saved HF dataset, or torchvision's Flowers102, as train/val/test splits.

``--data`` accepts
  flowers102              torchvision.datasets.Flowers102(download=True) into ``download_root`` (its own splits)
  flowers102:DIR          the same from a folder already holding it (torchvision's layout, download=False)
  DIR with train/ [val/|validation/] [test/]   one torchvision ImageFolder per split
  DIR written by datasets' save_to_disk        splits train / validation|val / test; columns image, label
  DIR of class folders                         one ImageFolder, split randomly (seeded) into train/val/test
Missing val/test splits are carved out of train (``val_fraction``, ``test_fraction``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

# DINOv2 and timm's FastViT both expect ImageNet normalisation.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ClassificationData:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def train_transform(image_size: int, normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)) -> Callable:
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(*normalization),
    ])


def eval_transform(image_size: int, normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)) -> Callable:
    return T.Compose([
        T.Resize(int(round(image_size * 1.14))), T.CenterCrop(image_size),
        T.ToTensor(), T.Normalize(*normalization),
    ])


# torchvision's Flowers102 folder: <root>/flowers-102/ holding these.
FLOWERS102_FILES = ("jpg", "imagelabels.mat", "setid.mat")


def _flowers102(root: str, download: bool, train_tf: Callable, eval_tf: Callable) -> ClassificationData:
    try:
        splits = {s: tv_datasets.Flowers102(root, split=s, download=download, transform=tf)
                  for s, tf in (("train", train_tf), ("val", eval_tf), ("test", eval_tf))}
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        folder = Path(root) / "flowers-102"
        missing = [name for name in FLOWERS102_FILES if not (folder / name).exists()]
        what = f"missing {', '.join(missing)}" if missing else "a file differs from torchvision's (checksum)"
        raise FileNotFoundError(f"--data flowers102:{root}: {folder} does not hold Flowers102 in torchvision's "
                                f"layout ({what}; expected {', '.join(FLOWERS102_FILES)}). Download it with "
                                f"--data flowers102, or torchvision.datasets.Flowers102(root, download=True)") from e
    return ClassificationData(splits["train"], splits["val"], splits["test"], [str(i) for i in range(102)])


class _HFImageDataset(Dataset):
    """A datasets.Dataset (image + label columns) as (tensor, int) pairs."""

    def __init__(self, ds, transform: Callable, image_column: str, label_column: str):
        self.ds, self.transform = ds, transform
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.ds[int(i)]
        return self.transform(row[self.image_column].convert("RGB")), int(row[self.label_column])


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _first_dir(root: Path, names: tuple[str, ...]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_classification_data(spec: str, image_size: int, seed: int = 0, val_fraction: float = 0.1,
                             test_fraction: float = 0.1, download_root: str = "data/flowers102",
                             normalization: Normalization = (IMAGENET_MEAN, IMAGENET_STD)) -> ClassificationData:
    train_tf, eval_tf = train_transform(image_size, normalization), eval_transform(image_size, normalization)
    if spec.lower() == "flowers102":
        return _flowers102(download_root, True, train_tf, eval_tf)
    if spec.lower().startswith("flowers102:"):
        return _flowers102(spec.split(":", 1)[1], False, train_tf, eval_tf)

    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {spec!r}: not a folder (and not 'flowers102')")
    if (root / "dataset_dict.json").is_file() or (root / "dataset_info.json").is_file():
        return _load_hf(root, train_tf, eval_tf, seed, val_fraction, test_fraction)

    train_dir = _first_dir(root, ("train",))
    if train_dir is not None:
        train = tv_datasets.ImageFolder(train_dir, transform=train_tf)
        val_dir, test_dir = _first_dir(root, ("val", "validation")), _first_dir(root, ("test",))
        if val_dir is not None and test_dir is not None:
            val = tv_datasets.ImageFolder(val_dir, transform=eval_tf)
            test = tv_datasets.ImageFolder(test_dir, transform=eval_tf)
            if val.classes != train.classes or test.classes != train.classes:
                raise ValueError(f"--data {spec}: train/val/test class folders differ")
            return ClassificationData(train, val, test, train.classes)
        root = train_dir  # carve the missing splits out of train
    as_train = tv_datasets.ImageFolder(root, transform=train_tf)
    as_eval = tv_datasets.ImageFolder(root, transform=eval_tf)
    tr, va, te = _split_indices(len(as_train), val_fraction, test_fraction, seed)
    return ClassificationData(Subset(as_train, tr), Subset(as_eval, va), Subset(as_eval, te), as_train.classes)


def _load_hf(root: Path, train_tf: Callable, eval_tf: Callable, seed: int, val_fraction: float,
             test_fraction: float) -> ClassificationData:
    import datasets

    loaded = datasets.load_from_disk(str(root))
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    train = splits["train"]
    image_column = next(c for c in ("image", "img") if c in train.column_names)
    label_column = next(c for c in ("label", "labels") if c in train.column_names)
    feature = train.features[label_column]
    classes = list(feature.names) if hasattr(feature, "names") else [str(c) for c in sorted(set(train[label_column]))]
    val = splits.get("validation", splits.get("val"))
    test = splits.get("test")

    def wrap(ds, tf):
        return _HFImageDataset(ds, tf, image_column, label_column)

    if val is not None and test is not None:
        return ClassificationData(wrap(train, train_tf), wrap(val, eval_tf), wrap(test, eval_tf), classes)
    tr, va, te = _split_indices(len(train), val_fraction, test_fraction, seed)
    return ClassificationData(Subset(wrap(train, train_tf), tr), Subset(wrap(train, eval_tf), va),
                              Subset(wrap(train, eval_tf), te), classes)


SYNTHETIC_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 230), "yellow": (230, 220, 40)}


def write_synthetic_imagefolder(root: str | Path, per_class: int = 40, image_size: int = 28, seed: int = 0,
                                splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """A tiny classification set whose class is the colour of a randomly placed square or disc on a dark noisy
    background; written as ``root/{train,val,test}/{colour}/*.png`` (val/test get a quarter of ``per_class``)."""
    root = Path(root)
    rng = random.Random(seed)
    for split in splits:
        count = per_class if split == "train" else max(per_class // 4, 4)
        for colour, rgb in SYNTHETIC_COLOURS.items():
            folder = root / split / colour
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.new("RGB", (image_size, image_size))
                image.putdata([tuple(rng.randrange(0, 60) for _ in range(3)) for _ in range(image_size ** 2)])
                draw = ImageDraw.Draw(image)
                side = rng.randrange(image_size // 3, image_size // 2 + 2)
                x, y = rng.randrange(0, image_size - side), rng.randrange(0, image_size - side)
                shade = tuple(min(255, max(0, c + rng.randrange(-25, 26))) for c in rgb)
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + side, y + side], fill=shade)
                image.save(folder / f"{i:04d}.png")
    return root
