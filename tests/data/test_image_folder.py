"""Image folders: class order, labels, RGB conversion, bilinear resizing and the errors."""

import numpy as np
import pytest
from PIL import Image

from alijax.data.files import FormatError
from alijax.data.image_folder import list_image_folder, load_image_folder

RED, BLUE, GREEN = (255, 0, 0), (10, 20, 200), (0, 128, 0)


def _solid(path, colour, size=(6, 4), mode="RGB"):
    """A solid image of PIL size (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def two_classes(tmp_path):
    # "dog" is made first, so the order must come from sorting, not from the file system.
    _solid(tmp_path / "dog" / "b.png", BLUE, size=(8, 8))
    _solid(tmp_path / "dog" / "a.PNG", GREEN, size=(5, 7))
    _solid(tmp_path / "cat" / "x.png", RED, size=(6, 4))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_labels_classes_and_resized_pixels(two_classes):
    images, labels, class_names = load_image_folder(two_classes, image_size=(3, 5))
    assert class_names == ["cat", "dog"]
    assert images.shape == (3, 3, 5, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 1, 1])
    # A solid colour stays exactly that colour under bilinear resizing.
    for image, colour in zip(images, [RED, GREEN, BLUE]):  # dog: a.PNG before b.png
        np.testing.assert_array_equal(image, np.broadcast_to(colour, (3, 5, 3)))


def test_list_image_folder_reads_no_image(two_classes):
    (two_classes / "dog" / "c.jpg").write_bytes(b"not decoded by listing")
    paths, labels, class_names = list_image_folder(two_classes)
    names = [p.split("/")[-2:] for p in paths]
    assert names == [["cat", "x.png"], ["dog", "a.PNG"], ["dog", "b.png"], ["dog", "c.jpg"]]
    np.testing.assert_array_equal(labels, [0, 1, 1, 1])


def test_resize_is_bilinear(tmp_path):
    gradient = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))  # [8, 8], columns 0..224
    rgb = np.stack([gradient, gradient.T, np.full_like(gradient, 7)], axis=-1)
    (tmp_path / "only").mkdir()
    Image.fromarray(rgb).save(tmp_path / "only" / "g.png")
    images, _, _ = load_image_folder(tmp_path, image_size=(4, 3))
    want_bilinear = np.asarray(Image.fromarray(rgb).resize((3, 4), Image.Resampling.BILINEAR))
    want_nearest = np.asarray(Image.fromarray(rgb).resize((3, 4), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(images[0], want_bilinear)
    assert not np.array_equal(images[0], want_nearest)
    # Horizontal gradient stays increasing left to right, vertical one top to bottom.
    assert np.all(np.diff(images[0, :, :, 0].astype(int), axis=1) > 0)
    assert np.all(np.diff(images[0, :, :, 1].astype(int), axis=0) > 0)


def test_grey_rgba_and_palette_become_rgb(tmp_path):
    _solid(tmp_path / "a" / "grey.png", 77, mode="L")
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 90, 80, 70])  # index 1 -> (90, 80, 70)
    palette.save(tmp_path / "a" / "p.png")
    _solid(tmp_path / "a" / "rgba.png", (1, 2, 3, 128), mode="RGBA")
    _solid(tmp_path / "a" / "z.bmp", (40, 50, 60))
    images, _, _ = load_image_folder(tmp_path, image_size=(4, 6))  # no resize needed
    assert Image.open(tmp_path / "a" / "p.png").mode == "P"
    np.testing.assert_array_equal(images[0], np.full((4, 6, 3), 77))
    np.testing.assert_array_equal(images[1], np.broadcast_to((90, 80, 70), (4, 6, 3)))
    np.testing.assert_array_equal(images[2], np.broadcast_to((1, 2, 3), (4, 6, 3)))
    np.testing.assert_array_equal(images[3], np.broadcast_to((40, 50, 60), (4, 6, 3)))


def test_extensions_argument_and_hidden_files(tmp_path):
    _solid(tmp_path / "a" / "keep.bmp", RED)
    _solid(tmp_path / "a" / "sub" / "deep.bmp", BLUE)
    _solid(tmp_path / "a" / "skip.png", GREEN)
    (tmp_path / "a" / "._keep.bmp").write_bytes(b"macOS resource fork")
    _solid(tmp_path / ".hidden_class" / "x.bmp", RED)
    images, _, class_names = load_image_folder(tmp_path, (2, 2), extensions=(".BMP",))
    assert class_names == ["a"]
    np.testing.assert_array_equal(images[:, 0, 0], [RED, BLUE])  # keep.bmp, then sub/deep.bmp


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "nowhere", (4, 4))


def test_no_class_folders(tmp_path):
    _solid(tmp_path / "loose.png", RED)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        load_image_folder(tmp_path, (4, 4))


def test_class_without_images(tmp_path):
    _solid(tmp_path / "cat" / "x.png", RED)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"\['dog'\] .* hold no images"):
        load_image_folder(tmp_path, (4, 4))


def test_unreadable_image_names_the_file(tmp_path):
    _solid(tmp_path / "cat" / "a.png", RED)
    (tmp_path / "cat" / "b.png").write_bytes(b"\x89PNG but then nothing")
    with pytest.raises(FormatError, match=r"cat/b\.png: cannot read image"):
        load_image_folder(tmp_path, (4, 4))


def test_truncated_png_names_the_file(tmp_path):
    _solid(tmp_path / "cat" / "a.png", RED, size=(64, 64))
    data = (tmp_path / "cat" / "a.png").read_bytes()
    (tmp_path / "cat" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cat/a\.png: cannot read image"):
        load_image_folder(tmp_path, (4, 4))


@pytest.mark.parametrize("image_size", [(4,), (0, 4), (4.0, 4), (4, 4, 3)])
def test_bad_image_size(tmp_path, image_size):
    with pytest.raises(ValueError, match="image_size="):
        load_image_folder(tmp_path, image_size)


def test_bad_extensions(tmp_path):
    _solid(tmp_path / "a" / "x.png", RED)
    with pytest.raises(ValueError, match="extensions="):
        load_image_folder(tmp_path, (4, 4), extensions=("png",))
