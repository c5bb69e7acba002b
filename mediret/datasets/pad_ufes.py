"""Reader for PAD-UFES-20: metadata.csv plus the PNG images below images/.

One record per metadata row, in file order. image_id is ``img_id`` without its
extension (``PAT_46_881_939``), like the other readers' ids; the file is looked
up by the full ``img_id`` anywhere below ``images/`` (flat, or the Mendeley
``imgs_part_1..3/`` split). label: ``diagnostic`` (ACK, BCC, MEL, NEV, SCC,
SEK); group: ``patient_id``. meta: the other columns, typed: True/False ->
bool, numbers -> int/float, and both '' (not collected) and 'UNK' (patient did
not know) -> None. The PNGs are RGBA with an opaque alpha; ingest converts.
"""

from __future__ import annotations

from pathlib import Path

from mediret.datasets.common import (
    DatasetFormat,
    ImageIndex,
    blank_fields,
    csv_header,
    find_images,
    folder_of,
    read_table,
    typed,
)
from mediret.errors import DatasetFormatError
from mediret.records import DatasetScan, ImageRecord

METADATA = "metadata.csv"
IMAGES = "images"
KEY_COLUMNS = ("patient_id", "img_id", "diagnostic")


def detect(path: Path) -> bool:
    label_file = path if path.name == METADATA else path / METADATA
    return set(KEY_COLUMNS) <= set(csv_header(label_file))


def read(path: Path) -> DatasetScan:
    root = folder_of(path, METADATA)
    if not (root / METADATA).is_file():
        raise DatasetFormatError(f"{root} has no {METADATA}")
    rows, problems = read_table(root / METADATA, KEY_COLUMNS)
    image_root = root / IMAGES if (root / IMAGES).is_dir() else root
    images = ImageIndex(find_images(image_root))
    records = []
    for row in rows:
        blank = blank_fields(row, ("img_id", "diagnostic"))
        if blank:
            problems.append(blank)
            continue
        image = images.take(row["img_id"], row.where)
        if image is None:
            continue
        records.append(
            ImageRecord(
                image_id=Path(row["img_id"]).stem,
                source=str(image),
                labels=(row["diagnostic"],),
                group=row["patient_id"] or None,
                meta={
                    name: None if value == "UNK" else typed(value)
                    for name, value in row.values.items()
                    if name not in KEY_COLUMNS
                },
            )
        )
    images.report_unlabeled(METADATA)
    return DatasetScan(
        name="pad-ufes-20",
        root=str(root),
        records=records,
        label_names=sorted({r.labels[0] for r in records}),
        problems=problems + images.problems,
    )


FORMAT = DatasetFormat(
    name="pad-ufes-20",
    looks_for=f"{METADATA} with columns {', '.join(KEY_COLUMNS)}, images below {IMAGES}/",
    detect=detect,
    read=read,
)
