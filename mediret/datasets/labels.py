"""Labels from a CSV joined onto any dataset's records by a chosen key (an id, a path, a group or a meta field)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mediret.datasets.common import read_table
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord, Problem

LABEL_COLUMN = "label"
MULTI_LABEL_SEPARATOR = "|"
# Keys every record has, beside its group's field and its meta fields.
RECORD_KEYS = ("image_id", "path", "group")


def join_labels(scan: DatasetScan, csv_path: str | Path, on: str,
                column: str = LABEL_COLUMN) -> DatasetScan:
    """``scan`` with each record's labels replaced by those of the CSV row whose ``on`` column
    matches it; the records no row matches are left out.

    on: ``image_id``, ``path`` (the record's file; a relative path in the CSV is
        taken from the dataset folder), ``group`` or the field the groups come
        from (``PatientID`` for DICOM), or any meta field (``StudyInstanceUID``,
        ``SOPInstanceUID``, ...). A row may label several records (a study's images).
    column: the label column; ``a|b`` gives two labels, and any ``|`` makes the
        scan multi-label (where an empty cell is no label; else it is a 'malformed-row').

    Problems, added to the scan's: a record without a row ('missing-label'), a
    row without a record ('missing-image'), a second row with the same key
    ('duplicate'), a row with an empty key or label ('malformed-row').
    """
    csv_path = Path(csv_path)
    key_of = _key_function(scan, on)
    rows, problems = read_table(csv_path, [on, column])
    multilabel = any(MULTI_LABEL_SEPARATOR in row[column] for row in rows)
    by_key: dict[str, tuple[str, tuple[str, ...]]] = {}  # key -> (where, labels)
    for row in rows:
        key = _path_key(scan.root, row[on]) if on == "path" else row[on]
        labels = tuple(dict.fromkeys(
            p.strip() for p in row[column].split(MULTI_LABEL_SEPARATOR) if p.strip()))
        if not row[on] or (not labels and not multilabel):
            empty = on if not row[on] else column
            problems.append(Problem(row.where, f"empty {empty}", "malformed-row"))
        elif key in by_key:
            problems.append(Problem(row.where, f"{on} {row[on]!r} is labelled by an earlier row, "
                                    f"{by_key[key][0]}; that one is used", "duplicate"))
        else:
            by_key[key] = (row.where, labels)
    records: list[ImageRecord] = []
    used: set[str] = set()
    for record in scan.records:
        key = key_of(record)
        if key is None or key not in by_key:
            problems.append(Problem(record.source, f"no row of {csv_path} has {on} {key!r}",
                                    "missing-label"))
            continue
        used.add(key)
        records.append(replace(record, labels=by_key[key][1]))
    problems += [Problem(where, f"{on} {key!r} matches no image found in {scan.root}", "missing-image")
                 for key, (where, _) in by_key.items() if key not in used]
    label_names = sorted({label for _, labels in by_key.values() for label in labels})
    return replace(scan, records=records, label_names=label_names, multilabel=multilabel,
                   problems=[*scan.problems, *problems])


def _key_function(scan: DatasetScan, on: str) -> Callable[[ImageRecord], str | None]:
    """How to read key ``on`` off a record; DatasetFormatError naming the valid keys when none has it."""
    if on == "image_id":
        return lambda record: record.image_id
    if on == "path":
        return lambda record: _path_key(scan.root, record.source)
    if on == "group" or (on == scan.group_field and scan.group_field is not None):
        return lambda record: record.group
    if any(on in record.meta for record in scan.records):
        return lambda record: _meta_key(record.meta.get(on))
    fields = sorted({name for record in scan.records for name in record.meta})
    valid = [*RECORD_KEYS, *([scan.group_field] if scan.group_field else []), *fields]
    raise DatasetFormatError(f"--on {on}: no record of {scan.root} has that field; valid keys: "
                             f"{', '.join(valid)}")


def _meta_key(value) -> str | None:
    """A meta value as the CSV would write it (numbers as in their text), None for lists and absent values."""
    if value is None or isinstance(value, (list, dict)):
        return None
    return str(value)


def _path_key(root: str, path: str) -> str:
    return os.path.normpath(os.path.join(root, os.path.expanduser(path)))
