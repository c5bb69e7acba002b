"""A stored image's ``source`` -> PIL image: image files and MedMNIST ``file.npz#split/index``."""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

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
        if path.suffix.lower() == ".dcm":
            return dicom_image(path.read_bytes())
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


def decode_image(data: bytes, source: str):
    """An image file's bytes as a PIL image, lazily decoded (DICOM decoded at once)."""
    from PIL import Image

    if source.lower().endswith(".dcm"):
        return dicom_image(data)
    return Image.open(io.BytesIO(data))


class JpegFrame(NamedTuple):
    """A JPEG's frame header: what PIL's JPEG plugin parses before it decodes."""

    width: int
    height: int
    components: int  # 3: YCbCr or RGB, 1: greyscale, 4: CMYK or YCCK
    precision: int  # bits per sample


# Frame headers a plain JPEG decoder takes: baseline, extended sequential, progressive.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2)
# Segments that may come before the frame header: tables (DHT, DAC, DQT, DRI), comments, APPn.
_TABLE_MARKERS = frozenset((0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)))


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of JPEG ``data``, found by walking its segments; None when
    ``data`` does not start as a JPEG, or reaches anything else first (a lossless or
    arithmetic-coded frame, fill bytes, a truncated segment)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _SOF_MARKERS:
            if at + 10 > len(data):
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, at + 4)
            return JpegFrame(width, height, components, precision)
        if marker not in _TABLE_MARKERS:
            return None
        at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def dicom_image(data: bytes):
    """A DICOM file's pixels as an 8-bit grayscale PIL image (min-max scaled, MONOCHROME1 inverted).

    CBIS-DDSM distributes its mammograms as DICOM; most users convert them, but
    reading them directly saves a step.
    """
    from PIL import Image

    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise OSError("reading DICOM needs pydicom (pip install pydicom)") from exc
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float32)
    except (InvalidDicomError, AttributeError, KeyError) as exc:
        raise OSError(f"not a readable DICOM image: {exc}") from exc
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[0]  # multi-frame: first frame
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) * 255 if high > low else np.zeros_like(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 255 - scaled
    return Image.fromarray(scaled.round().astype(np.uint8))
