"""Reader for DICOM as hospitals store it: a folder of Part-10 files (any depth, any file
names) or a DICOMDIR -> one record per image instance, with a fixed set of its tags.

A file is DICOM when it has the Part-10 marker (``DICM`` at byte 128), whatever
its name: PACS exports name files ``IM000001`` or by UID, without extension.
Each file's tags are read (never its pixels: ingest decodes them through
``mediret.dicom``); image_id: SOPInstanceUID; source: the file's path; group:
the PatientID tag (``group_tag``); no labels (``mediret.datasets.labels`` joins
them from a CSV). Files without pixel data (structured reports, presentation
states, key-object notes), with a transfer syntax or photometric interpretation
no decoder here reads, or that do not parse, are reported and left out;
DICOMDIR files themselves are indexes, not images, and entries a DICOMDIR names
but whose files are missing are reported as 'missing-image'.

meta holds only the tags of ``KEPT_TAGS`` (plus those named in ``keep_tags``)
and how the pixels will be read: ``window`` (``C,W``, ``voi-lut`` or ``minmax``)
and ``rescale`` ([slope, intercept], or ``modality-lut``) for grey images. Nothing
else of the file is copied: names, birth dates, addresses, phone numbers, other
patient ids, institution and physician names and every other tag stay in the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from mediret.datasets.common import DatasetFormat
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

# Tags copied into each record's meta: what a study is about and how it was acquired,
# nothing that names the patient, the staff or the place.
KEPT_TAGS = (
    "Modality", "BodyPartExamined", "ViewPosition", "Laterality", "ImageLaterality",
    "StudyDate", "PatientSex", "PatientAge", "Manufacturer",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    "PhotometricInterpretation", "Rows", "Columns", "BitsStored", "NumberOfFrames",
)
DEFAULT_GROUP_TAG = "PatientID"
DICOMDIR = "DICOMDIR"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # SOP class of a DICOMDIR
# Files looked at to recognise a folder without a DICOMDIR (it is DICOM if most of them are).
DETECT_SAMPLE = 64


def detect(path: Path) -> bool:
    if path.is_file():
        return path.name.upper() == DICOMDIR
    if not path.is_dir():
        return False
    if _dicomdir_of(path) is not None:
        return True
    sample = []
    for file in _files(path):
        sample.append(is_dicom_file(file))
        if len(sample) == DETECT_SAMPLE:
            break
    return sum(sample) * 2 > len(sample)


def read(path: Path, group_tag: str = DEFAULT_GROUP_TAG, keep_tags: tuple[str, ...] = (),
         dicom=None) -> DatasetScan:
    """The image instances below ``path`` (a folder, or a DICOMDIR: its folder).

    group_tag: the tag whose value is each record's group (default PatientID).
    keep_tags: tags copied into meta beside ``KEPT_TAGS`` (e.g. PatientName), by keyword.
    dicom: the ``mediret.dicom.DicomOptions`` ingest will read pixels with (the
        window and frame recorded in meta; files lacking that frame are reported).
    """
    from mediret.dicom import DicomOptions

    dicom = dicom or DicomOptions()
    for keyword in (group_tag, *keep_tags):
        _check_keyword(keyword)
    root = path.parent if path.is_file() else path
    if not root.is_dir():
        raise DatasetFormatError(f"{path} is neither a folder nor a DICOMDIR")
    problems: list[Problem] = []
    records: list[ImageRecord] = []
    first_file: dict[str, Path] = {}
    found: set[str] = set()
    for file in _files(root):
        if not is_dicom_file(file):
            continue
        found.add(os.path.normcase(str(file)).lower())
        record = _record(root, file, group_tag, keep_tags, dicom, problems)
        if record is None:
            continue
        first = first_file.setdefault(record.image_id, file)
        if first != file:
            problems.append(Problem(str(file), f"same SOPInstanceUID as {first}; that one is used",
                                    "duplicate"))
            continue
        records.append(record)
    dicomdir = path if path.is_file() else _dicomdir_of(root)
    if dicomdir is not None:
        problems += _missing_referenced(dicomdir, found)
    return DatasetScan("dicom", str(root), records, [], False, problems, group_field=group_tag)


def is_dicom_file(path: Path) -> bool:
    """Whether the file has the Part-10 marker: ``DICM`` after a 128-byte preamble."""
    from mediret.dicom import is_dicom

    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def _files(root: Path):
    """Every file below root, sorted folder by folder; hidden files and folders skipped."""
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder, name)


def _dicomdir_of(folder: Path) -> Path | None:
    for name in (DICOMDIR, DICOMDIR.lower()):
        if (folder / name).is_file():
            return folder / name
    return None


def _check_keyword(keyword: str) -> None:
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(keyword) is None:
        raise DatasetFormatError(f"{keyword!r} is not a DICOM attribute keyword "
                                 "(keywords are spelt as in PS3.6, e.g. PatientID, PatientName)")


def _record(root: Path, file: Path, group_tag: str, keep_tags: tuple[str, ...], dicom,
            problems: list[Problem]) -> ImageRecord | None:
    """The file's record, or None after reporting why it has none (a DICOMDIR gets neither)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from mediret.dicom import DicomError, decodable_problem, frame_index

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        problems.append(Problem(str(file), f"not a readable DICOM file: {exc}", "unreadable-image"))
        return None
    file_meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or getattr(file_meta, "MediaStorageSOPClassUID", None)
    if sop_class == MEDIA_DIRECTORY:
        return None
    problem = decodable_problem(ds)
    if problem is None:
        try:
            frame_index(ds, dicom)
        except DicomError as exc:
            problem = "unreadable-image", str(exc)
    if problem is not None:
        problems.append(Problem(str(file), problem[1], problem[0]))
        return None
    image_id = (ds.get("SOPInstanceUID") or getattr(file_meta, "MediaStorageSOPInstanceUID", None)
                or file.relative_to(root).as_posix())
    group = _value(ds.get(group_tag))
    return ImageRecord(image_id=str(image_id), source=str(file), labels=(),
                       group=None if group is None else str(group), meta=_meta(ds, keep_tags, dicom))


def _meta(ds, keep_tags: tuple[str, ...], dicom) -> dict:
    from mediret.dicom import voi_choice

    meta = {}
    for keyword in dict.fromkeys((*KEPT_TAGS, *keep_tags)):
        value = _value(ds.get(keyword))
        if value is not None:
            meta[keyword] = value
    if ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2"):
        meta["window"] = voi_choice(ds, dicom).describe()
        if ds.get("ModalityLUTSequence"):
            meta["rescale"] = "modality-lut"
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            meta["rescale"] = [float(ds.RescaleSlope), float(ds.RescaleIntercept)]
    return meta


def _value(value):
    """A tag's value as JSON: numbers stay numbers, several values a list, the rest text;
    None when empty, binary or a sequence (those are not copied)."""
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence

    if value is None or value == "" or isinstance(value, (bytes, Sequence)):
        return None
    if isinstance(value, MultiValue):
        values = [_value(v) for v in value]
        return [v for v in values if v is not None] or None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _missing_referenced(dicomdir: Path, found: set[str]) -> list[Problem]:
    """'missing-image' for each file the DICOMDIR names that is not there (names compared
    ignoring case: media are written in upper case and often copied in lower case)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(dicomdir)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        return [Problem(str(dicomdir), f"not a readable DICOMDIR: {exc}", "unreadable-image")]
    problems = []
    for item in ds.get("DirectoryRecordSequence") or []:
        parts = item.get("ReferencedFileID")
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        file = dicomdir.parent.joinpath(*parts)
        if os.path.normcase(str(file)).lower() not in found:
            problems.append(Problem(str(file), f"named by {dicomdir} ({item.get('DirectoryRecordType', 'a')} "
                                    "record), but no such DICOM file was found", "missing-image"))
    return problems


FORMAT = DatasetFormat(
    name="dicom",
    looks_for="a DICOMDIR, or a folder (any depth) whose files are mostly DICOM Part-10 "
    "files (any names, with or without .dcm)",
    detect=detect,
    read=read,
    options=frozenset({"group_tag", "keep_tags", "dicom"}),
)
