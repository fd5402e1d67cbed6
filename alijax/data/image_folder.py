"""Images in a folder per class (the torchvision ImageFolder layout): root/<class>/<...>/<image>.

Classes are the sub-folders of root sorted by name (label i is the i-th name); the images of a class
are the files below its folder, at any depth, whose extension matches (case-insensitive), sorted by
relative path. Hidden files and folders (names starting with ".", such as macOS "._x.png") are
skipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from alijax.data.files import FormatError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def list_image_folder(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], np.ndarray, list[str]]:
    """The image paths [N], their labels int32 [N] and the class names, without reading any image."""
    root = os.fspath(root)
    extensions = _check_extensions(extensions)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root=} is not a folder; expected one sub-folder of images per class"
        )
    class_names = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    if not class_names:
        raise FileNotFoundError(f"{root=} has no class sub-folders; expected root/<class>/<image>")
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        files = _image_files(os.path.join(root, name), extensions)
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty:
        raise FileNotFoundError(
            f"class folder(s) {empty} under {root=} hold no images with {extensions=}"
        )
    return paths, np.asarray(labels, dtype=np.int32), class_names


def load_image_folder(
    root: str | os.PathLike,
    image_size: tuple[int, int],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N, H, W, 3] (RGB, resized bilinearly to image_size=(H, W)), labels int32 [N],
    class names [num_classes]."""
    if len(image_size) != 2 or not all(
        isinstance(s, (int, np.integer)) and s > 0 for s in image_size
    ):
        raise ValueError(f"{image_size=} must be (height, width), two positive ints")
    paths, labels, class_names = list_image_folder(root, extensions)
    images = np.empty((len(paths), *image_size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = read_image(path, image_size)
    return images, labels, class_names


def read_image(path: str | os.PathLike, image_size: tuple[int, int]) -> np.ndarray:
    """One image file as uint8 [H, W, 3] RGB, resized bilinearly to image_size=(H, W)."""
    height, width = image_size
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FormatError(f"{os.fspath(path)}: cannot read image ({e})") from e
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _check_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = (extensions,)
    if not extensions or not all(isinstance(e, str) and e.startswith(".") for e in extensions):
        raise ValueError(f"{extensions=} must be a non-empty sequence like ('.png', '.jpg')")
    return tuple(e.lower() for e in extensions)


def _image_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(extensions)
        ]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))
