"""Built-in data for the demo, the command line and the tests, plus an ImageFolder loader.

The digits are scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), which ship
with scikit-learn: nothing is downloaded. They come in three layouts:

- ``"flat"``:  [N, 64] vectors (MLPs),
- ``"image"``: [N, 1, 8, 8] images (small CNNs, the row Transformer),
- ``"rgb32"``: [N, 3, 32, 32] images, each pixel a 4x4 block, copied to three channels
  (CIFAR-sized models such as torchvision's ResNets).

Pixels are standardised with the mean and standard deviation of the training split.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DIGITS_LAYOUTS",
    "digits_tensors",
    "digits_dataset",
    "digits_loader",
    "image_folder_loader",
]

DIGITS_LAYOUTS = ("flat", "image", "rgb32")
DIGITS_SPLITS = ("train", "test")
DIGITS_CLASSES = 10
TEST_FRACTION = 0.25
SPLIT_SEED = 0

# File endings an image folder's class directories are searched for (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@functools.lru_cache(maxsize=1)
def _standardised_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): flat float32 pixels, standardised on train; cached."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    train_x = torch.as_tensor(train_x, dtype=torch.float32)
    test_x = torch.as_tensor(test_x, dtype=torch.float32)
    mean, std = train_x.mean(), train_x.std()
    return (
        (train_x - mean) / std,
        torch.as_tensor(train_y, dtype=torch.long),
        (test_x - mean) / std,
        torch.as_tensor(test_y, dtype=torch.long),
    )


def digits_tensors(split: str = "train", layout: str = "flat") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of one split of the digits, in one layout.

    Args:
        split: ``"train"`` (1347 samples) or ``"test"`` (450), a stratified split with a fixed
            seed, the same on every call and machine.
        layout: ``"flat"`` [N, 64], ``"image"`` [N, 1, 8, 8] or ``"rgb32"`` [N, 3, 32, 32].

    Returns:
        (inputs float32, labels int64 in 0..9). Fresh tensors: callers may modify them.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {', '.join(DIGITS_SPLITS)}, got {split!r}")
    if layout not in DIGITS_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(DIGITS_LAYOUTS)}, got {layout!r}")
    train_x, train_y, test_x, test_y = _standardised_digits()
    inputs, labels = (train_x, train_y) if split == "train" else (test_x, test_y)
    if layout == "flat":
        return inputs.clone(), labels.clone()
    images = inputs.reshape(-1, 1, 8, 8)
    if layout == "image":
        return images.clone(), labels.clone()
    upsampled = images.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    return upsampled.expand(-1, 3, -1, -1).contiguous(), labels.clone()


def digits_dataset(split: str = "train", layout: str = "flat") -> TensorDataset:
    """The digits split as a TensorDataset (see `digits_tensors`)."""
    return TensorDataset(*digits_tensors(split, layout))


def digits_loader(
    split: str = "train",
    layout: str = "flat",
    batch_size: int = 64,
    shuffle: Optional[bool] = None,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over the digits.

    Args:
        split, layout: as in `digits_tensors`.
        batch_size: samples per batch (>= 1).
        shuffle: default True for ``"train"``, False for ``"test"``.
        seed: seeds the shuffling generator, so that the batch order is the same for every
            loader built with the same seed (the demo relies on it).
        drop_last: drop a last, smaller batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if shuffle is None:
        shuffle = split == "train"
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        digits_dataset(split, layout), batch_size=batch_size, shuffle=shuffle,
        generator=generator, drop_last=drop_last,
    )


def _check_image_folder(root: Path) -> None:
    """Fail early, before torchvision is imported, on a folder ImageFolder cannot use."""
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {str(root)!r} is not a folder")
    class_dirs = [entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    if not class_dirs:
        raise ValueError(
            f"data folder {str(root)!r} has no class subfolders (expected root/<class>/<image>)"
        )
    for class_dir in class_dirs:
        for _, _, files in os.walk(class_dir):
            if any(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
                return
    raise ValueError(
        f"data folder {str(root)!r} contains no images (looked for {', '.join(IMAGE_SUFFIXES)})"
    )


def image_folder_loader(
    root: str | os.PathLike,
    batch_size: int = 64,
    image_size: int = 224,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over an ImageFolder directory (root/<class>/<image>), via torchvision.

    Images are resized (shorter side) and centre-cropped to ``image_size``, converted to
    RGB tensors and normalised with the ImageNet channel statistics, as the torchvision
    classification models expect.

    Raises:
        FileNotFoundError / NotADirectoryError: the path is missing or not a folder.
        ValueError: the folder has no class subfolders or no image files.
        ImportError: torchvision is not installed (it is imported only here).
    """
    root = Path(root)
    _check_image_folder(root)
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise ImportError(
            "reading an image folder needs torchvision, which is not installed "
            f"(pip install torchvision): {error}"
        ) from error
    transform = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
