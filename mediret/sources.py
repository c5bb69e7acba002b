"""A stored image's ``source`` -> PIL image: image files and MedMNIST ``file.npz#split/index``."""

from __future__ import annotations

import functools
from pathlib import Path

from .errors import SearchError


def split_source(source: str) -> tuple[Path, str | None, int | None]:
    """``file.npz#split/index`` -> (file, split, index); any other source -> (path, None, None)."""
    path, sep, fragment = source.partition("#")
    if not sep or not path.lower().endswith(".npz"):
        return Path(source), None, None
    split, _, index = fragment.partition("/")
    if not split or not index.isdigit():
        raise SearchError(f"'{source}' is not a MedMNIST source; expected FILE.npz#SPLIT/INDEX, "
                          "e.g. pneumoniamnist.npz#test/0")
    return Path(path), split, int(index)


def source_exists(source: str) -> bool:
    return split_source(source)[0].is_file()


def open_source(source: str):
    """The image behind ``source`` as a PIL image, not converted.

    Raises FileNotFoundError when the file is gone, SearchError when a
    ``.npz`` lacks the split or index named.
    """
    from PIL import Image

    path, split, index = split_source(source)
    if split is None:
        return Image.open(path)
    images = _npz_images(str(path), split)
    if not 0 <= index < len(images):
        raise SearchError(f"{path} has {len(images)} {split} images; index {index} is out of range")
    return Image.fromarray(images[index])


@functools.lru_cache(maxsize=4)
def _npz_images(path: str, split: str):
    """One split's image array of an .npz (cached: a contact sheet reads many images of a file)."""
    import numpy as np

    with np.load(path) as arrays:
        key = f"{split}_images"
        if key not in arrays.files:
            raise SearchError(f"{path} has no '{key}' array; it has: {', '.join(arrays.files)}")
        return arrays[key]
