"""Reader for MedMNIST .npz files (train/val/test images and labels in one array file).

The path is the .npz itself or a folder holding exactly one. Each image
becomes a record carrying its pixels (uint8 HxW or HxWxC); source is
``<file>.npz#<split>/<index>`` and image_id ``<split>_<index>``, split as the
file gives it. Labels are class names for the subsets listed in
``LABEL_NAMES`` (keyed by the file stem without a ``_64``/``_128``/``_224``
size suffix), else the class index as text. Labels of shape (N, L>1) are
multi-hot (ChestMNIST): the record's labels are the classes marked 1.
MedMNIST 3-D volumes are not supported.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from mediret.datasets.common import DatasetFormat
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord

SPLITS = ("train", "val", "test")

# Class names as MedMNIST v2 publishes them (INFO[...]["label"]), by index.
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal, benign"),
    "chestmnist": (
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
        "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
}


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".npz"
    return path.is_dir() and any(path.glob("*.npz"))


def read(path: Path) -> DatasetScan:
    import numpy as np

    npz = _npz_file(path)
    try:
        with np.load(npz) as arrays:
            splits = [s for s in SPLITS if f"{s}_images" in arrays.files]
            if not splits:
                raise DatasetFormatError(
                    f"{npz} has none of the MedMNIST keys "
                    f"{', '.join(s + '_images' for s in SPLITS)}; it has: {', '.join(arrays.files)}"
                )
            data = {s: (arrays[f"{s}_images"], _labels_of(arrays, s, npz)) for s in splits}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetFormatError(f"cannot read {npz}: {e}") from e
    stem = re.sub(r"_\d+$", "", npz.stem)
    multilabel = any(labels.shape[1] > 1 for _, labels in data.values())
    class_count = (
        max(labels.shape[1] for _, labels in data.values())
        if multilabel
        else int(max(labels.max(initial=0) for _, labels in data.values())) + 1
    )
    names = LABEL_NAMES.get(stem)
    if names is None or len(names) < class_count:
        names = tuple(str(i) for i in range(class_count))
    records = []
    for split, (images, labels) in data.items():
        for index, (pixels, label_row) in enumerate(zip(images, labels)):
            classes = np.flatnonzero(label_row) if multilabel else label_row[:1]
            records.append(
                ImageRecord(
                    image_id=f"{split}_{index}",
                    source=f"{npz}#{split}/{index}",
                    labels=tuple(names[int(c)] for c in classes),
                    split=split,
                    pixels=pixels,
                )
            )
    return DatasetScan("medmnist", str(npz), records, list(names), multilabel)


def _npz_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.npz"))
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise DatasetFormatError(
            f"{path} should hold exactly one .npz file (found: {listed}); give the .npz file itself"
        )
    return found[0]


def _labels_of(arrays, split: str, npz: Path):
    """The split's labels as an (N, L) integer array, checked against its images."""
    images = arrays[f"{split}_images"]
    key = f"{split}_labels"
    if key not in arrays.files:
        raise DatasetFormatError(f"{npz} has {split}_images but no {key}")
    labels = arrays[key]
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise DatasetFormatError(f"{npz}: {key} has shape {labels.shape}; expected (N,) or (N, L)")
    if len(labels) != len(images):
        raise DatasetFormatError(f"{npz}: {len(images)} {split} images but {len(labels)} labels")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise DatasetFormatError(
            f"{npz}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3) "
            "(3-D MedMNIST volumes are not supported)"
        )
    if images.dtype != "uint8":
        raise DatasetFormatError(f"{npz}: {split}_images are {images.dtype}, expected uint8")
    if labels.size and labels.min() < 0:
        raise DatasetFormatError(f"{npz}: {split}_labels has negative values")
    return labels


FORMAT = DatasetFormat(
    name="medmnist",
    looks_for="a MedMNIST .npz file (keys train_images, train_labels, val_*, test_*), "
    "or a folder holding exactly one",
    detect=detect,
    read=read,
)
