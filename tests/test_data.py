"""Built-in digits data, the ImageFolder loader's errors, and the reference models' layouts."""

import importlib.util

import pytest
import torch

from nio_fast.data import (
    DIGITS_LAYOUTS,
    digits_dataset,
    digits_loader,
    digits_tensors,
    image_folder_loader,
)
from nio_fast.models import digits_cnn, digits_mlp, digits_transformer

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

SHAPES = {"flat": (64,), "image": (1, 8, 8), "rgb32": (3, 32, 32)}


@pytest.mark.parametrize("layout", DIGITS_LAYOUTS)
@pytest.mark.parametrize("split, size", [("train", 1347), ("test", 450)])
def test_digits_shapes_and_labels(layout, split, size):
    inputs, labels = digits_tensors(split, layout)
    assert inputs.shape == (size, *SHAPES[layout]) and inputs.dtype == torch.float32
    assert labels.shape == (size,) and labels.dtype == torch.long
    assert set(labels.tolist()) == set(range(10))


def test_split_is_fixed_stratified_and_standardised_on_train():
    first, second = digits_tensors("train"), digits_tensors("train")
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[1], second[1])
    train_x, train_y = first
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4
    test_y = digits_tensors("test")[1]
    # Stratified: each class keeps its share in the test split to within one sample.
    train_share = torch.bincount(train_y, minlength=10).double() / len(train_y)
    expected = train_share * len(test_y)
    assert (torch.bincount(test_y, minlength=10).double() - expected).abs().max() <= 1.5


def test_layouts_hold_the_same_pixels():
    flat, _ = digits_tensors("test", "flat")
    image, _ = digits_tensors("test", "image")
    rgb, _ = digits_tensors("test", "rgb32")
    assert torch.equal(image.reshape(-1, 64), flat)
    # Each pixel becomes a 4x4 block, the same in all three channels.
    assert torch.equal(rgb[:, :, ::4, ::4], image.expand(-1, 3, -1, -1))
    assert torch.equal(rgb[:, :, 3::4, 3::4], image.expand(-1, 3, -1, -1))


def test_callers_get_fresh_tensors():
    inputs, labels = digits_tensors("train")
    inputs.zero_()
    labels.zero_()
    assert digits_tensors("train")[0].abs().sum() > 0
    assert digits_tensors("train")[1].sum() > 0


def test_loader_order_depends_only_on_the_seed():
    def labels(seed):
        return torch.cat([y for _, y in digits_loader("train", batch_size=100, seed=seed)])

    assert torch.equal(labels(3), labels(3))
    assert not torch.equal(labels(3), labels(4))
    test_labels = torch.cat([y for _, y in digits_loader("test", batch_size=100)])
    assert torch.equal(test_labels, digits_tensors("test")[1])  # test split: not shuffled
    assert len(digits_dataset("test", "image")) == 450


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: digits_tensors("valid"), "split must be"),
        (lambda: digits_tensors("train", "rgb"), "layout must be"),
        (lambda: digits_loader(batch_size=0), "batch_size must be"),
    ],
)
def test_bad_digits_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_image_folder_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_loader(tmp_path / "nowhere")


def test_image_folder_path_is_a_file(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        image_folder_loader(file)


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "stray.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        image_folder_loader(tmp_path)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="contains no images"):
        image_folder_loader(tmp_path)


def _write_png(path, shade):
    from PIL import Image

    Image.new("RGB", (12, 10), color=(shade, 0, 255 - shade)).save(path)


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_image_folder_without_torchvision_says_how_to_get_it(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torchvision"):
        image_folder_loader(tmp_path)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
def test_image_folder_loads_with_torchvision(tmp_path):
    for label, shade in [("cat", 10), ("dog", 200)]:
        (tmp_path / label).mkdir()
        for index in range(3):
            _write_png(tmp_path / label / f"{index}.png", shade)
    inputs, labels = next(iter(image_folder_loader(tmp_path, batch_size=6, image_size=8)))
    assert inputs.shape == (6, 3, 8, 8)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "builder, layouts",
    [
        (lambda: digits_mlp(depth=3, width=8), ["flat", "image"]),
        (lambda: digits_cnn(channels=4), ["image"]),
        (lambda: digits_cnn(channels=4, in_channels=3), ["rgb32"]),
        (lambda: digits_transformer(d_model=8, nhead=2, layers=1), ["flat", "image"]),
    ],
)
def test_reference_models_accept_their_layouts(builder, layouts):
    model = builder()
    for layout in layouts:
        inputs, _ = digits_tensors("test", layout)
        assert model(inputs[:5]).shape == (5, 10)


def test_mlp_depth_counts_linear_layers():
    linear_layers = [m for m in digits_mlp(depth=5, width=8) if isinstance(m, torch.nn.Linear)]
    assert len(linear_layers) == 5
    assert [layer.out_features for layer in linear_layers] == [8, 8, 8, 8, 10]
