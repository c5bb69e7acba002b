"""Reader for HAM10000: HAM10000_metadata.csv plus the images below the same folder.

One record per metadata row, in file order. image_id is the ``image_id``
column (``ISIC_0024306``) and matches the image file's name without its
extension; images are searched anywhere below the folder, so both the
``HAM10000_images_part_1/``/``_part_2/`` layout and a flat folder work.
label: ``dx`` (one of akiec, bcc, bkl, df, mel, nv, vasc); group: ``lesion_id``
(a lesion may have several images: split by group to avoid near-duplicates).
"""

from __future__ import annotations

from pathlib import Path

from mediret.datasets.common import (
    DatasetFormat,
    ImageIndex,
    blank_fields,
    file_stem,
    find_images,
    folder_of,
    read_table,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord

METADATA = "HAM10000_metadata.csv"
META_COLUMNS = ("dx_type", "age", "sex", "localization")


def detect(path: Path) -> bool:
    return (path / METADATA).is_file() or path.name == METADATA


def read(path: Path) -> DatasetScan:
    root = folder_of(path, METADATA)
    if not (root / METADATA).is_file():
        raise DatasetFormatError(f"{root} has no {METADATA}")
    rows, problems = read_table(root / METADATA, ("lesion_id", "image_id", "dx", *META_COLUMNS))
    images = ImageIndex(find_images(root), key=file_stem)
    records = []
    for row in rows:
        blank = blank_fields(row, ("image_id", "dx"))
        if blank:
            problems.append(blank)
            continue
        image = images.take(row["image_id"], row.where)
        if image is None:
            continue
        records.append(
            ImageRecord(
                image_id=row["image_id"],
                source=str(image),
                labels=(row["dx"],),
                group=row["lesion_id"] or None,
                meta={name: typed(row[name]) for name in META_COLUMNS},
            )
        )
    images.report_unlabeled(METADATA)
    return DatasetScan(
        name="ham10000",
        root=str(root),
        records=records,
        label_names=sorted({r.labels[0] for r in records}),
        problems=problems + images.problems,
    )


FORMAT = DatasetFormat(
    name="ham10000",
    looks_for=f"{METADATA} with images (e.g. HAM10000_images_part_1/, _part_2/) below the same folder",
    detect=detect,
    read=read,
)
