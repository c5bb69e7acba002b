"""Reader for CheXpert chest radiographs (CheXpert-v1.0 or -small): train.csv / valid.csv plus images.

The path is the dataset folder holding the CSVs, or its parent. ``Path``
cells (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``)
are resolved under the parent of the CSV's folder, under the CSV's folder,
and under the CSV's folder without the leading dataset folder name (copies
that renamed it). One record per row; image_id is the Path without the
dataset folder and extension (``train/patient00001/study1/view1_frontal``);
split: ``train`` or ``valid`` after the CSV; group: the ``patientNNNNN`` part.

Labels follow the U-Zeros policy of the CheXpert paper: an observation is a
label when its value is 1.0; uncertain (-1.0) and blank count as absent.
meta keeps Sex, Age, Frontal/Lateral, AP/PA and every observation's raw value
(1.0, 0.0, -1.0, or None when blank), so other policies can be applied later.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from mediret.datasets.common import (
    DatasetFormat,
    ImageIndex,
    blank_fields,
    csv_header,
    find_images,
    read_table,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
STUDY_COLUMNS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv"}
_PATIENT = re.compile(r"patient\d+")


def detect(path: Path) -> bool:
    return _dataset_folder(path) is not None


def read(path: Path) -> DatasetScan:
    folder = _dataset_folder(path)
    if folder is None:
        raise DatasetFormatError(
            f"{path} has no CheXpert train.csv or valid.csv (with Path and observation columns), "
            "in it or in a CheXpert-v1.0* folder inside it"
        )
    problems: list[Problem] = []
    images = ImageIndex(find_images(folder), key=str)
    records = []
    for split, name in SPLIT_FILES.items():
        if not (folder / name).is_file():
            continue
        rows, bad = read_table(folder / name, ("Path", *OBSERVATIONS))
        problems += bad
        for row in rows:
            values = _observations(row.values)
            problem = blank_fields(row, ("Path",))
            if problem is None and values is None:
                problem = Problem(row.where, "observations must be 1.0, 0.0, -1.0 or blank", "malformed-row")
            if problem:
                problems.append(problem)
                continue
            relative = PurePosixPath(row["Path"].replace("\\", "/"))
            image = _resolve(folder, relative, images, row.where)
            if image is None:
                continue
            records.append(
                ImageRecord(
                    image_id=str(_without_dataset_folder(relative).with_suffix("")),
                    source=image,
                    labels=tuple(o for o in OBSERVATIONS if values[o] == 1.0),
                    group=next((p for p in relative.parts if _PATIENT.fullmatch(p)), None),
                    split=split,
                    meta={**{c: typed(row.values.get(c, "")) for c in STUDY_COLUMNS}, **values},
                )
            )
    images.report_unlabeled(" or ".join(SPLIT_FILES.values()))
    return DatasetScan("chexpert", str(folder), records, list(OBSERVATIONS), True,
                       problems + images.problems)


def _dataset_folder(path: Path) -> Path | None:
    """The folder holding train.csv/valid.csv: path itself or a CheXpert-v1.0* folder in it."""
    if not path.is_dir():
        return None
    for folder in (path, *sorted(path.glob("CheXpert-v1.0*"))):
        if any(_is_label_file(folder / name) for name in SPLIT_FILES.values()):
            return folder
    return None


def _is_label_file(path: Path) -> bool:
    return {"Path", *OBSERVATIONS} <= set(csv_header(path))


def _observations(row: dict[str, str]) -> dict[str, float | None] | None:
    """Each observation's raw value as a float (None when blank); None if any is not a CheXpert value."""
    values = {}
    for name in OBSERVATIONS:
        try:
            values[name] = float(row[name]) if row[name] else None
        except ValueError:
            return None
        if values[name] not in (None, 1.0, 0.0, -1.0):
            return None
    return values


def _without_dataset_folder(relative: PurePosixPath) -> PurePosixPath:
    if relative.parts and relative.parts[0].lower().startswith("chexpert"):
        return PurePosixPath(*relative.parts[1:])
    return relative


def _resolve(folder: Path, relative: PurePosixPath, images: ImageIndex, where: str) -> str | None:
    candidates = [folder.parent / relative, folder / relative, folder / _without_dataset_folder(relative)]
    key = next((str(c) for c in candidates if str(c) in images.by_key), str(candidates[0]))
    path = images.take(key, where)
    return None if path is None else str(path)


FORMAT = DatasetFormat(
    name="chexpert",
    looks_for="CheXpert train.csv / valid.csv (columns Path, No Finding, ...), "
    "in the folder or a CheXpert-v1.0* folder inside it",
    detect=detect,
    read=read,
)
