"""Reader for ODIR-5K fundus photographs, in its Kaggle and its original layout.

Kaggle layout: ``full_df.csv`` + ``preprocessed_images/``. One row per eye
image, named by ``filename`` (``filepath`` points at Kaggle input paths and is
ignored). label: the per-image ``labels`` cell (``['N']`` -> ``('N',)``), one
label per image, so ``multilabel`` is False.

Original layout: the annotation workbook (``ODIR-5K_Training_Annotations
(Updated)_V2.xlsx``, or ``data.xlsx`` in the Kaggle copy) with one row per
patient naming both eyes' files, images in ``ODIR-5K_Training_Dataset/`` or
``Training Images/`` (else anywhere below the folder). labels: the
patient-level flags N..O that are set, given to both eyes (multi-label) - the
workbook has no per-eye label.

In both layouts image_id is the file name without extension (``0_right``),
group the patient ``ID``, and meta holds the patient-level flags N..O as ints,
age, sex, the eye and that eye's diagnostic keywords.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mediret.datasets.common import (
    DatasetFormat,
    ImageIndex,
    Row,
    blank_fields,
    find_images,
    folder_of,
    read_table,
    require_columns,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")
KAGGLE_CSV = "full_df.csv"
KAGGLE_IMAGES = "preprocessed_images"
WORKBOOK_IMAGE_FOLDERS = ("ODIR-5K_Training_Dataset", "Training Images")
PATIENT_COLUMNS = (
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *LABELS,
)


def detect(path: Path) -> bool:
    if path.is_file():
        return path.name == KAGGLE_CSV or _is_workbook(path)
    return (path / KAGGLE_CSV).is_file() or _find_workbook(path) is not None


def read(path: Path) -> DatasetScan:
    if path.is_file() and path.suffix.lower() == ".xlsx":
        return _read_workbook(path, path.parent)
    root = folder_of(path, KAGGLE_CSV)
    if (root / KAGGLE_CSV).is_file():
        return _read_kaggle(root)
    workbook = _find_workbook(root)
    if workbook is None:
        raise DatasetFormatError(
            f"{root} has neither {KAGGLE_CSV} nor an ODIR-5K annotation .xlsx "
            f"next to {'/ or '.join(WORKBOOK_IMAGE_FOLDERS)}/"
        )
    return _read_workbook(workbook, root)


def _is_workbook(path: Path) -> bool:
    return path.suffix.lower() == ".xlsx" and "odir" in path.name.lower()


def _find_workbook(root: Path) -> Path | None:
    """The annotation workbook: an .xlsx named after ODIR, or the only .xlsx beside the training images."""
    if not root.is_dir():
        return None
    workbooks = sorted(p for p in root.glob("*.xlsx") if not p.name.startswith(("~$", ".")))
    named = [p for p in workbooks if _is_workbook(p)]
    if named:
        return named[0]
    if len(workbooks) == 1 and any((root / name).is_dir() for name in WORKBOOK_IMAGE_FOLDERS):
        return workbooks[0]
    return None


def _flags(row: Row) -> dict[str, int] | None:
    try:
        flags = {letter: int(float(row[letter])) for letter in LABELS}
    except ValueError:
        return None
    return flags if set(flags.values()) <= {0, 1} else None


def _eye_meta(row: Row, flags: dict[str, int], side: str) -> dict:
    return {
        **flags,
        "age": typed(row["Patient Age"]),
        "sex": row["Patient Sex"] or None,
        "eye": side.lower(),
        "keywords": row[f"{side}-Diagnostic Keywords"] or None,
    }


def _per_image_label(cell: str) -> tuple[str, ...] | None:
    """``"['N']"`` -> ``('N',)``; None when the cell is not a list of ODIR letters."""
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, list) or not value or not all(v in LABELS for v in value):
        return None
    return tuple(value)


def _read_kaggle(root: Path) -> DatasetScan:
    label_file = root / KAGGLE_CSV
    rows, problems = read_table(label_file, (*PATIENT_COLUMNS, "labels", "filename"))
    image_root = root / KAGGLE_IMAGES if (root / KAGGLE_IMAGES).is_dir() else root
    images = ImageIndex(find_images(image_root))
    records = []
    for row in rows:
        flags = _flags(row)
        labels = _per_image_label(row["labels"])
        problem = blank_fields(row, ("ID", "filename")) or _kaggle_row_problem(row, flags, labels)
        if problem:
            problems.append(problem)
            continue
        side = "Left" if row["filename"] == row["Left-Fundus"] else "Right"
        image = images.take(row["filename"], row.where)
        if image is None:
            continue
        records.append(
            ImageRecord(
                image_id=Path(row["filename"]).stem,
                source=str(image),
                labels=labels,
                group=row["ID"],
                meta=_eye_meta(row, flags, side),
            )
        )
    images.report_unlabeled(KAGGLE_CSV)
    return DatasetScan("odir", str(root), records, list(LABELS), False, problems + images.problems)


def _kaggle_row_problem(row: Row, flags: dict | None, labels: tuple | None) -> Problem | None:
    if flags is None:
        return Problem(row.where, "flags N..O must be 0 or 1", "malformed-row")
    if labels is None:
        return Problem(row.where, f"labels {row['labels']!r} is not a list of ODIR letters like ['N']",
                       "malformed-row")
    if row["filename"] not in (row["Left-Fundus"], row["Right-Fundus"]):
        return Problem(row.where, f"filename {row['filename']!r} is neither Left- nor Right-Fundus",
                       "malformed-row")
    return None


def _read_workbook(workbook: Path, root: Path) -> DatasetScan:
    rows = _workbook_rows(workbook)
    image_root = next((root / n for n in WORKBOOK_IMAGE_FOLDERS if (root / n).is_dir()), root)
    images = ImageIndex(find_images(image_root))
    problems: list[Problem] = []
    records = []
    for row in rows:
        flags = _flags(row)
        problem = blank_fields(row, ("ID",))
        if problem is None and flags is None:
            problem = Problem(row.where, "flags N..O must be 0 or 1", "malformed-row")
        if problem:
            problems.append(problem)
            continue
        for side in ("Left", "Right"):
            name = row[f"{side}-Fundus"]
            if not name:
                problems.append(Problem(row.where, f"empty {side}-Fundus", "malformed-row"))
                continue
            image = images.take(name, row.where)
            if image is None:
                continue
            records.append(
                ImageRecord(
                    image_id=Path(name).stem,
                    source=str(image),
                    labels=tuple(letter for letter in LABELS if flags[letter]),
                    group=row["ID"],
                    meta=_eye_meta(row, flags, side),
                )
            )
    images.report_unlabeled(workbook.name)
    return DatasetScan("odir", str(root), records, list(LABELS), True, problems + images.problems)


def _workbook_rows(workbook: Path) -> list[Row]:
    """The first sheet's rows as text cells, like a CSV's."""
    import openpyxl  # only this layout needs it
    from openpyxl.utils.exceptions import InvalidFileException
    from zipfile import BadZipFile

    try:
        book = openpyxl.load_workbook(workbook, read_only=True, data_only=True)
    except (OSError, InvalidFileException, BadZipFile, KeyError) as e:
        raise DatasetFormatError(f"cannot read {workbook}: {e}") from e
    try:
        lines = book.worksheets[0].iter_rows(values_only=True)
        header = [str(cell).strip() if cell is not None else "" for cell in next(lines, ())]
        require_columns(header, PATIENT_COLUMNS, workbook)
        rows = []
        for number, cells in enumerate(lines, start=2):
            if all(cell is None for cell in cells):
                continue
            text = ["" if cell is None else _cell_text(cell) for cell in cells]
            text += [""] * (len(header) - len(text))
            rows.append(Row(f"{workbook}:{number}", dict(zip(header, text))))
        return rows
    finally:
        book.close()


def _cell_text(cell: object) -> str:
    if isinstance(cell, float) and cell.is_integer():
        return str(int(cell))
    return str(cell).strip()


FORMAT = DatasetFormat(
    name="odir",
    looks_for=(
        f"{KAGGLE_CSV} with {KAGGLE_IMAGES}/, or an ODIR-5K annotation .xlsx "
        f"(named *ODIR*, or beside {'/ or '.join(WORKBOOK_IMAGE_FOLDERS)}/)"
    ),
    detect=detect,
    read=read,
)
