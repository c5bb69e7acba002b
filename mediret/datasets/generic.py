"""Readers for datasets in no named format: one folder per class, or a path,label[,group] CSV.

Folder: ``root/<class>/**/<image>``; the label is the class folder's name,
image_id the path below root (``nevus/a/img01.jpg``, extension kept so ids
stay unique). Images directly in root have no class and are reported as
'missing-label'.

CSV: a .csv file (or a folder holding exactly one) whose header has ``path``
and ``label`` and optionally ``group``; paths are absolute or relative to the
CSV's folder. ``label`` may hold several labels separated by ``|`` (the
dataset is then multi-label) or be empty for an image with no label in a
multi-label set. Other columns go to meta. image_id is the path as written.
The CSV is the dataset: image files it does not name are not looked for.

Neither reader opens images: empty or corrupt files are yielded and left to
ingest to report.
"""

from __future__ import annotations

import os
from pathlib import Path

from mediret.datasets.common import (
    DatasetFormat,
    csv_header,
    find_images,
    has_extension,
    read_table,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

CSV_COLUMNS = ("path", "label")
LABEL_SEPARATOR = "|"


def detect_folder(path: Path) -> bool:
    return path.is_dir() and _label_csv(path) is None and bool(_class_folders(path))


def read_folder(path: Path) -> DatasetScan:
    if not path.is_dir():
        raise DatasetFormatError(f"{path} is not a folder")
    records, problems = [], []
    for image in find_images(path):
        relative = image.relative_to(path)
        if len(relative.parts) == 1:
            problems.append(Problem(str(image), "image is not inside a class folder", "missing-label"))
            continue
        records.append(
            ImageRecord(
                image_id=relative.as_posix(),
                source=str(image),
                labels=(relative.parts[0],),
            )
        )
    if not records:
        raise DatasetFormatError(f"{path} has no class folders holding images (root/<class>/<image>)")
    return DatasetScan("folder", str(path), records, sorted({r.labels[0] for r in records}), False, problems)


def detect_csv(path: Path) -> bool:
    return _label_csv(path) is not None


def read_csv(path: Path) -> DatasetScan:
    label_file = _label_csv(path)
    if label_file is None:
        raise DatasetFormatError(
            f"{path} is not a CSV with a path,label[,group] header (nor a folder holding exactly one)"
        )
    rows, problems = read_table(label_file, CSV_COLUMNS)
    multilabel = any(LABEL_SEPARATOR in row["label"] for row in rows)
    records, seen = [], set()
    for row in rows:
        labels = tuple(label.strip() for label in row["label"].split(LABEL_SEPARATOR) if label.strip())
        image = label_file.parent / row["path"]  # an absolute path replaces the folder
        if not row["path"] or not (labels or multilabel):
            problems.append(Problem(row.where, "empty path" if not row["path"] else "empty label",
                                    "malformed-row"))
        elif not image.is_file():
            problems.append(Problem(str(image), f"named at {row.where}, but no such file", "missing-image"))
        elif image in seen:
            problems.append(Problem(row.where, f"{image} already named by an earlier row", "duplicate"))
        else:
            seen.add(image)
            records.append(
                ImageRecord(
                    image_id=row["path"].replace("\\", "/"),
                    source=str(image),
                    labels=labels,
                    group=row.values.get("group") or None,
                    meta={k: typed(v) for k, v in row.values.items() if k not in (*CSV_COLUMNS, "group")},
                )
            )
    label_names = sorted({label for r in records for label in r.labels})
    return DatasetScan("csv", str(label_file), records, label_names, multilabel, problems)


def _label_csv(path: Path) -> Path | None:
    """The path,label CSV that path is, or the only CSV in folder path when it is one."""
    if path.is_dir():
        found = [p for p in sorted(path.glob("*.csv")) if _has_csv_columns(p)]
        return found[0] if len(found) == 1 else None
    if path.is_file() and path.suffix.lower() == ".csv" and _has_csv_columns(path):
        return path
    return None


def _has_csv_columns(path: Path) -> bool:
    return set(CSV_COLUMNS) <= set(csv_header(path))


def _class_folders(root: Path) -> list[str]:
    """Sub-folders of root holding at least one image somewhere below them."""
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith(".") and _holds_image(entry.path):
            classes.append(entry.name)
    return classes


def _holds_image(folder: str) -> bool:
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(has_extension(name) and not name.startswith(".") for name in files):
            return True
    return False


FOLDER_FORMAT = DatasetFormat(
    name="folder",
    looks_for="one sub-folder per class holding image files (root/<class>/**/<image>)",
    detect=detect_folder,
    read=read_folder,
)

CSV_FORMAT = DatasetFormat(
    name="csv",
    looks_for="a .csv file (or a folder with exactly one) with header path,label[,group]",
    detect=detect_csv,
    read=read_csv,
)
