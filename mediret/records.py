"""The records that flow from dataset readers into ingest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image as a dataset describes it.

    image_id: unique within the dataset (e.g. ``ISIC_0024306``).
    source: the image file's path, or ``file.npz#split/index`` for array datasets.
    labels: the image's labels; one for single-label datasets, any number
        (possibly zero) for multi-label ones.
    group: patient or lesion id, ``None`` when the dataset has none.
    split: the split the dataset itself gives (MedMNIST's train/val/test), else ``None``.
    meta: the remaining metadata columns, JSON-serialisable values.
    pixels: the image itself when it is not a file (uint8 HxW or HxWxC).
    """

    image_id: str
    source: str
    labels: tuple[str, ...]
    group: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Problem:
    """Something in the input that could not be ingested, and why."""

    path: str
    reason: str
    kind: str  # 'unreadable-image' | 'missing-image' | 'missing-label' | 'duplicate' | ...


@dataclass
class DatasetScan:
    """What a reader found in a dataset folder: records to ingest and problems.

    name: dataset format name (``ham10000``, ``odir``, ...).
    label_names: every label the dataset defines, in a stable order.
    multilabel: whether an image may carry several labels.
    group_field: the column or tag the records' groups come from (DICOM's
        ``PatientID``), when the dataset names it: a key labels can be joined on.
    """

    name: str
    root: str
    records: list[ImageRecord]
    label_names: list[str]
    multilabel: bool = False
    problems: list[Problem] = field(default_factory=list)
    group_field: str | None = None
