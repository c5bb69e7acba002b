"""Helpers shared by the dataset readers: finding image files, reading label tables, typing values."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, Problem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset layout mediret can read: how to recognise it and how to read it.

    looks_for: the marker files or layout in a person's words; listed when no
        format recognises a folder.
    detect: cheap check on file names and CSV headers; never reads images.
    options: the keyword options ``read`` takes beside the path (e.g. the DICOM
        reader's ``group_tag``); ``read_dataset`` refuses others.
    """

    name: str
    looks_for: str
    detect: Callable[[Path], bool]
    read: Callable[..., DatasetScan]
    options: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Row:
    """One row of a label table, with where it came from for problem reports."""

    where: str  # "file.csv:LINE"
    values: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.values[column]


def has_extension(name: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def find_images(root: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file below root whose extension (any case) is in extensions, sorted.

    Hidden files and folders (name starting with '.') are skipped. Files are
    listed, never opened: empty or corrupt files are ingest's to report.
    """
    extensions = frozenset(extensions)
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(
            Path(folder, name)
            for name in files
            if not name.startswith(".") and has_extension(name, extensions)
        )
    return sorted(found)


def file_name(path: Path) -> str:
    return path.name


def file_stem(path: Path) -> str:
    return path.stem


class ImageIndex:
    """Image files keyed by name, matched one by one against label rows.

    Collects the problems of the matching in ``problems``: two files with the
    same key and a row naming an already used image ('duplicate'), a row whose
    image is absent ('missing-image', its path the key as the row gives it),
    and, from ``report_unlabeled``, files that no row named ('missing-label').
    """

    def __init__(self, paths: Iterable[Path], key: Callable[[Path], str] = file_name):
        self.by_key: dict[str, Path] = {}
        self.used: set[str] = set()
        self.problems: list[Problem] = []
        for path in paths:
            first = self.by_key.setdefault(key(path), path)
            if first != path:
                self.problems.append(
                    Problem(str(path), f"same image name as {first}; that one is used", "duplicate")
                )

    def take(self, key: str, where: str) -> Path | None:
        """The image file for key, or None after recording why there is none."""
        path = self.by_key.get(key)
        if path is None:
            self.problems.append(Problem(key, f"named at {where}, but no such image file was found",
                                         "missing-image"))
        elif key in self.used:
            self.problems.append(
                Problem(where, f"image {key!r} already named by an earlier row", "duplicate")
            )
            return None
        else:
            self.used.add(key)
        return path

    def report_unlabeled(self, label_file: str) -> None:
        self.problems.extend(
            Problem(str(path), f"image has no row in {label_file}", "missing-label")
            for key, path in self.by_key.items()
            if key not in self.used
        )


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file, or [] when it is absent or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def require_columns(columns: Iterable[str], required: Iterable[str], path: Path) -> None:
    columns = list(columns)
    missing = [name for name in required if name not in columns]
    if missing:
        raise DatasetFormatError(
            f"{path} lacks the column(s) {', '.join(missing)}; it has: {', '.join(columns)}"
        )


def read_table(path: Path, required: Iterable[str]) -> tuple[list[Row], list[Problem]]:
    """The rows of a CSV label file, values stripped of surrounding blanks.

    A row with too many or too few fields is reported as 'malformed-row' and
    left out; blank lines are skipped. A missing required column or an
    unreadable file raises DatasetFormatError.
    """
    rows, problems = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [name.strip() for name in reader.fieldnames or []]
            require_columns(columns, required, path)
            reader.fieldnames = columns
            for values in reader:
                where = f"{path}:{reader.line_num}"
                if None in values or None in values.values():
                    reason = f"expected {len(columns)} fields, found a different number"
                    problems.append(Problem(where, reason, "malformed-row"))
                    continue
                rows.append(Row(where, {k: v.strip() for k, v in values.items()}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetFormatError(f"cannot read {path}: {e}") from e
    return rows, problems


def blank_fields(row: Row, columns: Iterable[str]) -> Problem | None:
    """A 'malformed-row' problem when any of columns is empty in row, else None."""
    empty = [name for name in columns if not row[name]]
    if empty:
        return Problem(row.where, f"empty {', '.join(empty)}", "malformed-row")
    return None


_INT = re.compile(r"[+-]?(0|[1-9]\d*)")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?")


def typed(value: str) -> str | int | float | bool | None:
    """A metadata cell as a JSON value: '' -> None, True/False -> bool, numbers -> int/float.

    Zero-padded digit strings stay strings: they are identifiers, not numbers.
    """
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def folder_of(path: Path, *marker_names: str) -> Path:
    """The dataset folder: path itself, or its parent when path is one of the marker files."""
    if path.is_file() and path.name in marker_names:
        return path.parent
    if not path.is_dir():
        raise DatasetFormatError(f"{path} is neither a folder nor {' / '.join(marker_names)}")
    return path
