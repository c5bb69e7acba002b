"""Reader for CBIS-DDSM mammograms: the case-description CSVs plus the full mammograms.

Label files: ``{mass,calc}_case_description_{train,test}_set.csv`` in the
folder or one level below it (the Kaggle copy keeps them in ``csv/``); the
split comes from the file name. One record per full mammogram: rows sharing
the first component of ``image file path`` (``Mass-Training_P_00001_LEFT_CC``,
the image_id) are its abnormalities. label: ``malignant`` when any of them is
MALIGNANT, else ``benign`` (BENIGN and BENIGN_WITHOUT_CALLBACK); group:
``patient_id``.

The CSV paths point at DICOM files; users mostly hold PNG/JPEG conversions.
The full mammogram of a case is, in this order of preference:
1. the image file path exactly as written, under the folder, if it is not DICOM;
2. the single PNG/JPEG/... inside a folder named exactly like the image_id
   (anywhere below the folder, e.g. ``Mass-Training_P_00001_LEFT_CC/<uid>/<uid>/1-1.png``),
   or named ``<image_id>.<ext>``;
3. the DICOM file as written, else the single .dcm found as in 2.
Several candidates at one step are reported as 'ambiguous-image'. Folders
with a suffix (``..._LEFT_CC_1``) hold the cropped lesions and ROI masks,
never the full image; images in them are not reported as unlabeled. Reading
.dcm pixels needs pydicom at ingest.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path, PurePosixPath

from mediret.datasets.common import (
    IMAGE_EXTENSIONS,
    DatasetFormat,
    Row,
    blank_fields,
    find_images,
    read_table,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

LABEL_FILE_PATTERN = "*_case_description_*.csv"
PATH_COLUMNS = ("image file path", "cropped image file path", "ROI mask file path")
KEY_COLUMNS = ("patient_id", "left or right breast", "image view", "pathology", PATH_COLUMNS[0])
PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}
DICOM = ".dcm"
# Per-abnormality columns, kept in meta as lists (one entry per abnormality).
ABNORMALITY_COLUMNS = (
    "abnormality id", "abnormality type", "pathology", "assessment", "subtlety",
    "mass shape", "mass margins", "calc type", "calc distribution",
)


def detect(path: Path) -> bool:
    return path.is_dir() and bool(_label_files(path))


def read(path: Path) -> DatasetScan:
    if not path.is_dir():
        raise DatasetFormatError(f"{path} is not a folder")
    label_files = _label_files(path)
    if not label_files:
        raise DatasetFormatError(f"{path} has no {LABEL_FILE_PATTERN} (in it or one folder below)")
    problems: list[Problem] = []
    cases: dict[str, list[tuple[str, Row]]] = defaultdict(list)  # image_id -> (split, row)
    for label_file in label_files:
        rows, bad = read_table(label_file, KEY_COLUMNS)
        problems += bad
        split = "test" if "test" in label_file.name.lower() else "train"
        for row in rows:
            problem = blank_fields(row, KEY_COLUMNS) or _pathology_problem(row)
            if problem:
                problems.append(problem)
            else:
                cases[_case_folder(row[PATH_COLUMNS[0]])].append((split, row))

    files = find_images(path, IMAGE_EXTENSIONS | {DICOM})
    by_name = _files_by_name(path, files)
    records = []
    for image_id, rows in cases.items():
        image = _find_image(path, image_id, rows[0][1], by_name, problems)
        if image is not None:
            records.append(_record(image_id, image, rows))
    problems += _unlabeled(files, {Path(r.source) for r in records}, cases, by_name)
    return DatasetScan("cbis-ddsm", str(path), records, ["benign", "malignant"], False, problems)


def _label_files(root: Path) -> list[Path]:
    return sorted([*root.glob(LABEL_FILE_PATTERN), *root.glob(f"*/{LABEL_FILE_PATTERN}")])


def _case_folder(csv_path: str) -> str:
    return PurePosixPath(csv_path.replace("\\", "/")).parts[0]


def _pathology_problem(row: Row) -> Problem | None:
    if row["pathology"] in PATHOLOGY:
        return None
    return Problem(row.where, f"pathology {row['pathology']!r} is not one of {', '.join(PATHOLOGY)}",
                   "malformed-row")


def _files_by_name(root: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Each file under every name a case may find it by: its folders' names and its own stem."""
    by_name = defaultdict(list)
    for file in files:
        for name in dict.fromkeys((*file.relative_to(root).parts[:-1], file.stem)):
            by_name[name].append(file)
    return by_name


def _find_image(
    root: Path, image_id: str, row: Row, by_name: dict[str, list[Path]], problems: list[Problem]
) -> Path | None:
    """The full mammogram of a case, preferring a PNG/JPEG conversion over DICOM."""
    as_written = root / row[PATH_COLUMNS[0]].replace("\\", "/")
    if as_written.is_file() and as_written.suffix.lower() != DICOM:
        return as_written
    found = by_name.get(image_id, [])
    converted = [p for p in found if p.suffix.lower() != DICOM]
    dicoms = [as_written] if as_written.is_file() else [p for p in found if p.suffix.lower() == DICOM]
    for candidates in (converted, dicoms):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            listed = ", ".join(str(p) for p in candidates[:3])
            problems.append(Problem(row.where, f"{len(candidates)} images could be {image_id}: {listed}",
                                    "ambiguous-image"))
            return None
    problems.append(Problem(
        str(as_written),
        f"named at {row.where}, but neither this file nor a single image in a folder "
        f"named {image_id} or a file named {image_id}.* was found",
        "missing-image",
    ))
    return None


def _record(image_id: str, image: Path, rows: list[tuple[str, Row]]) -> ImageRecord:
    split, first = rows[0]
    abnormalities = [row for _, row in rows]
    labels = {PATHOLOGY[row["pathology"]] for row in abnormalities}
    density = first.values.get("breast_density") or first.values.get("breast density", "")
    meta = {
        "patient_id": first["patient_id"],
        "breast_density": typed(density),
        "side": first["left or right breast"],
        "view": first["image view"],
        "abnormality_count": len(abnormalities),
    }
    for column in ABNORMALITY_COLUMNS:
        if column in first.values:
            meta[column.replace(" ", "_")] = [typed(row[column]) for row in abnormalities]
    return ImageRecord(
        image_id=image_id,
        source=str(image),
        labels=("malignant",) if "malignant" in labels else ("benign",),
        group=first["patient_id"],
        split=split,
        meta=meta,
    )


def _unlabeled(files: list[Path], used: set[Path], cases: dict, by_name: dict) -> list[Problem]:
    """Images that are neither a record's nor inside a crop/ROI folder the CSVs name."""
    named = set(cases)
    for rows in cases.values():
        for _, row in rows:
            named.update(_case_folder(row[c]) for c in PATH_COLUMNS[1:] if row.values.get(c))
    covered = {file for name in named for file in by_name.get(name, [])}
    return [
        Problem(str(file), "image is not named by any case-description CSV", "missing-label")
        for file in files
        if file not in used and file not in covered
    ]


FORMAT = DatasetFormat(
    name="cbis-ddsm",
    looks_for=f"CBIS-DDSM {LABEL_FILE_PATTERN} (e.g. mass_case_description_train_set.csv), "
    "in the folder or one below it",
    detect=detect,
    read=read,
)
