"""A stored image's ``source`` -> PIL image: image files, DICOM files and MedMNIST ``file.npz#split/index``."""

from __future__ import annotations

import functools
import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .errors import SearchError

if TYPE_CHECKING:
    from .dicom import DicomOptions


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


def open_source(source: str, dicom: DicomOptions | None = None):
    """The image behind ``source`` as a PIL image, not converted.

    dicom: how DICOM files are read (``mediret.dicom.DicomOptions``: window,
        frame); pass the options the store recorded at ingest
        (``DicomOptions.from_info(store.get_info)``) so that a query reads as
        the stored images were read. Default: the file's own window, the middle frame.

    Raises FileNotFoundError when the file is gone, SearchError when a
    ``.npz`` lacks the split or index named, DicomError (an OSError) when a
    DICOM file's pixels cannot be read.
    """
    from PIL import Image

    path, split, index = split_source(source)
    if split is None:
        with open(path, "rb") as f:
            head = f.read(132)
        if _is_dicom(head, source):
            return decode_image(path.read_bytes(), source, dicom)
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


def decode_image(data: bytes, source: str, dicom: DicomOptions | None = None):
    """An image file's bytes as a PIL image, lazily decoded (DICOM decoded at once, with ``dicom``'s
    options: see ``open_source``)."""
    from PIL import Image

    if _is_dicom(data, source):
        from .dicom import dicom_image

        return dicom_image(data, dicom)
    return Image.open(io.BytesIO(data))


def _is_dicom(head: bytes, source: str) -> bool:
    """DICOM by name (``.dcm``) or by content (the Part-10 ``DICM`` marker; hospital files often
    have no extension)."""
    return source.lower().endswith(".dcm") or head[128:132] == b"DICM"


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
