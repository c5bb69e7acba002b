"""Dataset readers: a dataset folder or file -> ImageRecords plus the problems found on the way.

Readers only read label files and list image files (the DICOM reader reads
each file's tags, not its pixels); images are opened later by ingest.
``FORMATS`` lists them in detection order: the named datasets first, then a
folder of DICOM files, then the generic folder-per-class and path,label CSV layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

from mediret.datasets import cbis_ddsm, chexpert, dicom, generic, ham10000, medmnist, odir, pad_ufes
from mediret.datasets.common import DatasetFormat
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan

__all__ = ["FORMATS", "DatasetFormat", "detect_format", "read_dataset"]


def _registry(*formats: DatasetFormat) -> dict[str, DatasetFormat]:
    registry: dict[str, DatasetFormat] = {}
    for entry in formats:
        if entry.name in registry:
            raise ValueError(f"dataset format {entry.name!r} is registered twice")
        registry[entry.name] = entry
    return registry


FORMATS: dict[str, DatasetFormat] = _registry(
    ham10000.FORMAT,
    odir.FORMAT,
    pad_ufes.FORMAT,
    medmnist.FORMAT,
    cbis_ddsm.FORMAT,
    chexpert.FORMAT,
    dicom.FORMAT,
    generic.FOLDER_FORMAT,
    generic.CSV_FORMAT,
)


def detect_format(path: str | Path) -> str:
    """The name of the first format in FORMATS that recognises path.

    Raises DatasetFormatError listing what each format looks for when none does.
    """
    path = _existing(path)
    for entry in FORMATS.values():
        if entry.detect(path):
            return entry.name
    looked_for = "\n".join(f"  {entry.name}: {entry.looks_for}" for entry in FORMATS.values())
    raise DatasetFormatError(
        f"cannot tell the dataset format of {path}. Looked for:\n{looked_for}\n"
        f"Name the format explicitly if the layout is one of these: {', '.join(sorted(FORMATS))}."
    )


def read_dataset(path: str | Path, format: str | None = None, **options) -> DatasetScan:
    """Read the dataset at path (a folder, or a .npz/.csv/.xlsx file for formats that take one).

    format: a name from FORMATS, overriding detection.
    options: the format's own reading options (``DatasetFormat.options``, e.g.
        ``group_tag`` and ``keep_tags`` for dicom); an option the format does
        not take raises DatasetFormatError.
    """
    path = _existing(path)
    if format is None:
        format = detect_format(path)
    elif format not in FORMATS:
        raise DatasetFormatError(
            f"unknown dataset format {format!r}; valid formats: {', '.join(sorted(FORMATS))}"
        )
    entry = FORMATS[format]
    foreign = sorted(set(options) - entry.options)
    if foreign:
        takers = sorted(f.name for f in FORMATS.values() if set(foreign) & f.options)
        raise DatasetFormatError(
            f"{', '.join(foreign)} apply to {' / '.join(takers) or 'no'} datasets, and {path} "
            f"is read as {format}")
    return entry.read(path, **options)


def _existing(path: str | Path) -> Path:
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.exists():
        raise DatasetFormatError(f"{path} does not exist")
    return path
