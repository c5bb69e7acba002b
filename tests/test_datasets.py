"""Dataset readers on the real data in ../shared/data and on small fixtures in each real format."""

from __future__ import annotations

import csv
import json
import random
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mediret.datasets import FORMATS, detect_format, read_dataset
from mediret.errors import DatasetFormatError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM, ODIR, PAD = DATA / "ham10000", DATA / "odir", DATA / "pad-ufes-20"
PNEUMONIA = DATA / "medmnist" / "pneumoniamnist.npz"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"real dataset not found at {path}")


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[dict | list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if rows and isinstance(rows[0], dict):
            writer = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        else:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerows([header, *rows])
    return path


def copy(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def tiny_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)
    return path


def kinds(scan) -> Counter:
    return Counter(p.kind for p in scan.problems)


def by_id(scan) -> dict:
    return {r.image_id: r for r in scan.records}


# --- registry, detection, override ------------------------------------------------------


def test_formats_are_registered_in_detection_order():
    assert list(FORMATS) == [
        "ham10000", "odir", "pad-ufes-20", "medmnist", "cbis-ddsm", "chexpert", "dicom", "folder", "csv",
    ]
    assert all(entry.name == name for name, entry in FORMATS.items())


def test_unknown_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetFormatError) as error:
        detect_format(tmp_path)
    message = str(error.value)
    for name in FORMATS:
        assert f"  {name}: " in message
    for marker in ("HAM10000_metadata.csv", "full_df.csv", "metadata.csv", ".npz",
                   "_case_description_", "valid.csv", "per class", "path,label"):
        assert marker in message


def test_missing_path_and_unknown_format_name_fail_clearly(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetFormatError, match="valid formats: cbis-ddsm, chexpert, csv, dicom, folder"):
        read_dataset(tmp_path, format="isic")


@needs(PAD)
def test_format_override_wins_over_detection_and_checks_the_layout(tmp_path):
    with pytest.raises(DatasetFormatError, match="HAM10000_metadata.csv"):
        read_dataset(PAD, format="ham10000")
    # PAD's images/ folder read as one class: the override is obeyed.
    scan = read_dataset(PAD, format="folder")
    assert detect_format(PAD) == "pad-ufes-20"
    assert scan.name == "folder" and scan.label_names == ["images"] and len(scan.records) == 686


def test_label_files_without_required_columns_fail_naming_them(tmp_path):
    import openpyxl

    write_csv(tmp_path / "ham" / "HAM10000_metadata.csv", ["image_id", "dx"], [["ISIC_1", "nv"]])
    with pytest.raises(DatasetFormatError, match=r"lacks the column\(s\) lesion_id, dx_type"):
        read_dataset(tmp_path / "ham")
    book = openpyxl.Workbook()
    book.active.append(["ID", "Patient Age", "Left-Fundus"])
    book.save(tmp_path / "odir.xlsx")
    with pytest.raises(DatasetFormatError, match="lacks the column.*Right-Fundus"):
        read_dataset(tmp_path / "odir.xlsx")


# --- HAM10000 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ham_scan():
    if not HAM.is_dir():
        pytest.skip(f"real dataset not found at {HAM}")
    return read_dataset(HAM)


def test_ham10000_matches_its_metadata(ham_scan):
    rows = csv_rows(HAM / "HAM10000_metadata.csv")
    assert detect_format(HAM) == "ham10000"
    assert len(ham_scan.records) == len(rows) == 8013
    counts = Counter(label for r in ham_scan.records for label in r.labels)
    assert counts == Counter(row["dx"] for row in rows)
    assert counts == {"nv": 5345, "mel": 913, "bkl": 868, "bcc": 430, "akiec": 261, "vasc": 107, "df": 89}
    assert ham_scan.label_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert [r.image_id for r in ham_scan.records] == [row["image_id"] for row in rows]
    groups = {row["image_id"]: row["lesion_id"] for row in rows}
    assert {r.image_id: r.group for r in ham_scan.records} == groups
    assert len({r.group for r in ham_scan.records}) == 5974
    assert ham_scan.problems == [] and not ham_scan.multilabel
    assert all(Path(r.source).stem == r.image_id and Path(r.source).is_file() for r in ham_scan.records)
    first = ham_scan.records[0]
    assert first.meta == {"dx_type": "histo", "age": 80.0, "sex": "male", "localization": "scalp"}
    assert sum(r.meta["age"] is None for r in ham_scan.records) == sum(row["age"] == "" for row in rows)
    json.dumps([r.meta for r in ham_scan.records])


@needs(HAM)
def test_ham10000_reports_missing_unlabeled_duplicate_and_malformed(tmp_path):
    rows = random.Random(3).sample(csv_rows(HAM / "HAM10000_metadata.csv"), 30)
    for row in rows:
        src = next(HAM.glob(f"HAM10000_images_part_*/{row['image_id']}.jpg"))
        # One image a level deeper: images are searched recursively.
        deeper = "nested/" if row is rows[5] else ""
        copy(src, tmp_path / src.parent.name / deeper / src.name)
    missing = rows[0]["image_id"]
    next(tmp_path.rglob(f"{missing}.jpg")).unlink()
    extra = copy(next(tmp_path.rglob("*.jpg")), tmp_path / "HAM10000_images_part_2" / "ISIC_9999999.jpg")
    header = list(rows[0])
    label_file = write_csv(tmp_path / "HAM10000_metadata.csv", header, rows + [rows[7]])
    with open(label_file, "a") as f:
        f.write("HAM_X,ISIC_0000001,nv\n")  # too few fields
        f.write("HAM_Y,ISIC_0000002,,histo,50.0,male,back\n")  # empty dx

    scan = read_dataset(tmp_path)
    assert [r.image_id for r in scan.records] == [row["image_id"] for row in rows[1:]]
    assert kinds(scan) == {"missing-image": 1, "missing-label": 1, "duplicate": 1, "malformed-row": 2}
    problem = {p.kind: p for p in scan.problems}
    assert problem["missing-image"].path == missing
    assert problem["missing-image"].reason.startswith(f"named at {label_file}:2")
    assert problem["missing-label"].path == str(extra)
    assert problem["duplicate"].path.endswith(":32")
    assert by_id(scan)[rows[5]["image_id"]].source.endswith(f"nested/{rows[5]['image_id']}.jpg")


# --- ODIR-5K ----------------------------------------------------------------------------------


@needs(ODIR)
def test_odir_matches_full_df():
    rows = csv_rows(ODIR / "full_df.csv")
    scan = read_dataset(ODIR)
    assert detect_format(ODIR) == "odir"
    assert len(scan.records) == len(rows) == 6113
    assert len({r.group for r in scan.records}) == 3198
    assert scan.label_names == list("NDGCAHMO") and not scan.multilabel and scan.problems == []
    expected = {row["filename"][:-4]: row for row in rows}
    for record in scan.records:
        row = expected[record.image_id]
        assert record.labels == (row["labels"][2],) and len(row["labels"]) == 5
        assert record.group == row["ID"] and Path(record.source).name == row["filename"]
        assert {k: record.meta[k] for k in "NDGCAHMO"} == {k: int(row[k]) for k in "NDGCAHMO"}
        side = record.meta["eye"].capitalize()
        assert record.meta["keywords"] == row[f"{side}-Diagnostic Keywords"]
        assert row[f"{side}-Fundus"] == row["filename"]
    counts = Counter(r.labels[0] for r in scan.records)
    assert counts == {"N": 2786, "D": 1566, "O": 674, "C": 260, "A": 241, "G": 236, "M": 229, "H": 121}
    assert scan.records[0].meta["age"] == 69 and scan.records[0].meta["sex"] == "Female"


@needs(ODIR)
def test_odir_subset_reports_bad_rows_and_missing_images(tmp_path):
    rows = random.Random(2).sample(csv_rows(ODIR / "full_df.csv"), 8)
    for row in rows[1:]:  # rows[0]'s image is missing
        name = row["filename"]
        copy(ODIR / "preprocessed_images" / name, tmp_path / "preprocessed_images" / name)
    unlabeled = sorted(str(tmp_path / "preprocessed_images" / row["filename"]) for row in rows[2:4])
    rows[2] = rows[2] | {"labels": "['Z']"}
    rows[3] = rows[3] | {"filename": "renamed.jpg"}  # neither its Left- nor its Right-Fundus
    label_file = write_csv(tmp_path / "full_df.csv", list(rows[0]), rows)
    scan = read_dataset(tmp_path)
    assert [r.image_id for r in scan.records] == [row["filename"][:-4] for row in [rows[1], *rows[4:]]]
    assert [(p.kind, p.path) for p in scan.problems] == [
        ("malformed-row", f"{label_file}:4"),
        ("malformed-row", f"{label_file}:5"),
        ("missing-image", rows[0]["filename"]),
        *(("missing-label", path) for path in unlabeled),
    ]


@needs(ODIR)
def test_odir_annotation_workbook_gives_patient_flags_to_both_eyes(tmp_path):
    import openpyxl

    rows = csv_rows(ODIR / "full_df.csv")
    eyes = Counter(row["ID"] for row in rows)
    patients = {row["ID"]: row for row in rows if eyes[row["ID"]] == 2}
    chosen = [patients[i] for i in random.Random(5).sample(sorted(patients), 4)]
    columns = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus",
               "Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *"NDGCAHMO"]
    book = openpyxl.Workbook()
    book.active.append(columns)
    for row in chosen:
        book.active.append([int(row["ID"]), int(row["Patient Age"]), *(row[c] for c in columns[2:7]),
                            *(int(row[c]) for c in "NDGCAHMO")])
        for side in ("Left", "Right"):
            copy(ODIR / "preprocessed_images" / row[f"{side}-Fundus"],
                 tmp_path / "Training Images" / row[f"{side}-Fundus"])
    workbook = tmp_path / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
    book.save(workbook)
    (tmp_path / "Training Images" / chosen[0]["Right-Fundus"]).unlink()
    extra = copy(ODIR / "preprocessed_images" / rows[0]["filename"],
                 tmp_path / "Training Images" / "x_left.jpg")

    assert detect_format(tmp_path) == detect_format(workbook) == "odir"
    scan = read_dataset(tmp_path)
    assert scan.multilabel and len(scan.records) == 7
    assert kinds(scan) == {"missing-image": 1, "missing-label": 1}
    assert [p.path for p in scan.problems if p.kind == "missing-label"] == [str(extra)]
    for row in chosen:
        flags = tuple(letter for letter in "NDGCAHMO" if row[letter] == "1")
        for side in ("left", "right"):
            record = by_id(scan).get(f"{row['ID']}_{side}")
            if record is None:
                assert row is chosen[0] and side == "right"
                continue
            assert record.labels == flags and record.group == row["ID"]
            assert record.meta["eye"] == side and record.meta["age"] == int(row["Patient Age"])
            assert record.meta["keywords"] == row[f"{side.capitalize()}-Diagnostic Keywords"]
    assert len(read_dataset(workbook).records) == 7


# --- PAD-UFES-20 ------------------------------------------------------------------------------


@needs(PAD)
def test_pad_ufes_matches_metadata_and_types_meta():
    rows = csv_rows(PAD / "metadata.csv")
    scan = read_dataset(PAD)
    assert detect_format(PAD) == "pad-ufes-20"
    assert len(scan.records) == len(rows) == 686 and scan.problems == []
    assert len({r.group for r in scan.records}) == 537
    counts = Counter(r.labels[0] for r in scan.records)
    assert counts == Counter(row["diagnostic"] for row in rows)
    assert counts == {"BCC": 194, "NEV": 182, "SEK": 131, "ACK": 114, "MEL": 43, "SCC": 22}
    assert scan.label_names == ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    records = by_id(scan)
    assert set(records) == {row["img_id"][:-4] for row in rows}
    bcc = records["PAT_46_881_939"]
    assert bcc.group == "PAT_46" and bcc.labels == ("BCC",)
    assert bcc.meta["smoke"] is False and bcc.meta["itch"] is True and bcc.meta["age"] == 55
    assert bcc.meta["fitspatrick"] == 3.0 and bcc.meta["region"] == "NECK" and bcc.meta["lesion_id"] == 881
    assert "img_id" not in bcc.meta and "diagnostic" not in bcc.meta
    assert records["PAT_1516_1765_530"].meta["smoke"] is None
    unknown = next(row for row in rows if row["grew"] == "UNK")
    assert records[unknown["img_id"][:-4]].meta["grew"] is None
    json.dumps([r.meta for r in scan.records])


@needs(PAD)
def test_pad_ufes_finds_images_in_the_mendeley_part_folders(tmp_path):
    rows = random.Random(11).sample(csv_rows(PAD / "metadata.csv"), 12)
    for i, row in enumerate(rows):
        copy(PAD / "images" / row["img_id"], tmp_path / "images" / f"imgs_part_{i % 3 + 1}" / row["img_id"])
    write_csv(tmp_path / "metadata.csv", list(rows[0]), rows)
    (tmp_path / "images" / "imgs_part_2" / rows[1]["img_id"]).unlink()
    scan = read_dataset(tmp_path)
    assert [r.image_id for r in scan.records] == [row["img_id"][:-4] for row in rows if row is not rows[1]]
    assert [p.kind for p in scan.problems] == ["missing-image"]
    assert "imgs_part_3" in by_id(scan)[rows[2]["img_id"][:-4]].source


# --- MedMNIST ---------------------------------------------------------------------------------


@needs(PNEUMONIA)
def test_pneumoniamnist_splits_labels_and_pixels():
    scan = read_dataset(PNEUMONIA)
    assert detect_format(PNEUMONIA) == detect_format(PNEUMONIA.parent) == "medmnist"
    assert scan.label_names == ["normal", "pneumonia"] and not scan.multilabel and scan.problems == []
    with np.load(PNEUMONIA) as arrays:
        for split, size in (("train", 3882), ("val", 524), ("test", 624)):
            records = [r for r in scan.records if r.split == split]
            labels = arrays[f"{split}_labels"][:, 0]
            assert len(records) == len(labels) == size
            assert Counter(r.labels[0] for r in records) == {
                "normal": int((labels == 0).sum()), "pneumonia": int((labels == 1).sum())}
            index = 17
            assert records[index].image_id == f"{split}_{index}"
            assert records[index].source == f"{PNEUMONIA}#{split}/{index}"
            assert records[index].pixels.dtype == np.uint8
            assert np.array_equal(records[index].pixels, arrays[f"{split}_images"][index])
    assert Counter(r.labels[0] for r in scan.records if r.split == "val") == {"normal": 135, "pneumonia": 389}
    assert all(r.group is None for r in scan.records)
    assert [r.image_id for r in read_dataset(PNEUMONIA.parent).records] == [r.image_id for r in scan.records]


def test_medmnist_multilabel_unknown_names_and_ambiguous_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 28, 28), dtype=np.uint8)
    multi_hot = np.zeros((5, 14), dtype=np.uint8)
    multi_hot[0, [1, 4]] = 1
    multi_hot[2, 13] = 1
    np.savez(tmp_path / "chestmnist.npz", test_images=images, test_labels=multi_hot)
    chest = read_dataset(tmp_path / "chestmnist.npz")
    assert chest.multilabel and len(chest.label_names) == 14
    assert [r.labels for r in chest.records][:3] == [("cardiomegaly", "mass"), (), ("hernia",)]
    assert {r.split for r in chest.records} == {"test"}

    np.savez(tmp_path / "mysterymnist_64.npz", train_images=images,
             train_labels=np.array([[0], [2], [1], [2], [0]]))
    mystery = read_dataset(tmp_path / "mysterymnist_64.npz")
    assert mystery.label_names == ["0", "1", "2"] and [r.labels[0] for r in mystery.records] == list("02120")

    with pytest.raises(DatasetFormatError, match="chestmnist.npz, mysterymnist_64.npz.*give the .npz file"):
        read_dataset(tmp_path)


def test_medmnist_rejects_files_that_are_not_medmnist(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DatasetFormatError, match="train_images"):
        read_dataset(tmp_path / "other.npz")
    np.savez(tmp_path / "organmnist3d.npz", train_images=np.zeros((2, 28, 28, 28), np.uint8),
             train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetFormatError, match="3-D"):
        read_dataset(tmp_path / "organmnist3d.npz")


# --- CBIS-DDSM --------------------------------------------------------------------------------

MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]


def cbis_paths(case: str, abnormality: int = 1) -> list[str]:
    """The image, cropped and ROI paths the CSVs give, TCIA-style with fake UIDs."""
    uid = f"1.3.6.1.4.1.9590.100.1.2.{zlib.crc32(case.encode())}"
    crop = f"{case}_{abnormality}/{uid}.{abnormality}/{uid}.{abnormality}1/"
    return [f"{case}/{uid}.0/{uid}.1/000000.dcm", crop + "000000.dcm", crop + "000001.dcm\n"]


@pytest.fixture
def cbis_root(tmp_path) -> Path:
    mass = [
        ["P_00001", 3, "LEFT", "CC", 1, "mass", "IRREGULAR", "SPICULATED", 4, "MALIGNANT", 4],
        ["P_00004", 3, "LEFT", "MLO", 1, "mass", "OVAL", "CIRCUMSCRIBED", 3, "BENIGN", 5],
        ["P_00004", 3, "LEFT", "MLO", 2, "mass", "LOBULATED", "ILL_DEFINED", 4, "MALIGNANT", 3],
        ["P_00004", 3, "RIGHT", "MLO", 1, "mass", "OVAL", "CIRCUMSCRIBED", 2, "BENIGN_WITHOUT_CALLBACK", 5],
        ["P_00009", 2, "RIGHT", "CC", 1, "mass", "ROUND", "OBSCURED", 4, "MALIGNANT", 4],
        ["P_00010", 2, "LEFT", "CC", 1, "mass", "ROUND", "OBSCURED", 4, "UNPROVEN", 4],
    ]
    mass_cases = ["Mass-Training_P_00001_LEFT_CC", "Mass-Training_P_00004_LEFT_MLO",
                  "Mass-Training_P_00004_LEFT_MLO", "Mass-Training_P_00004_RIGHT_MLO",
                  "Mass-Training_P_00009_RIGHT_CC", "Mass-Training_P_00010_LEFT_CC"]
    write_csv(tmp_path / "mass_case_description_train_set.csv", MASS_HEADER,
              [row + cbis_paths(case, row[4]) for row, case in zip(mass, mass_cases)])
    calc = [
        ["P_00038", 2, "LEFT", "CC", 1, "calcification", "PUNCTATE", "CLUSTERED", 2, "BENIGN", 2],
        ["P_00038", 2, "RIGHT", "CC", 1, "calcification", "AMORPHOUS", "CLUSTERED", 4, "MALIGNANT", 3],
        ["P_00041", 1, "LEFT", "CC", 1, "calcification", "PLEOMORPHIC", "SEGMENTAL", 4, "MALIGNANT", 3],
    ]
    calc_cases = ["Calc-Test_P_00038_LEFT_CC", "Calc-Test_P_00038_RIGHT_CC", "Calc-Test_P_00041_LEFT_CC"]
    write_csv(tmp_path / "csv" / "calc_case_description_test_set.csv", CALC_HEADER,
              [row + cbis_paths(case) for row, case in zip(calc, calc_cases)])

    # PNG conversion keeping the TCIA tree, crops and ROI masks beside it.
    tiny_image(tmp_path / "Mass-Training_P_00001_LEFT_CC" / "a" / "b" / "1-1.png")
    tiny_image(tmp_path / "Mass-Training_P_00001_LEFT_CC_1" / "c" / "d" / "1-1.png")
    tiny_image(tmp_path / "Mass-Training_P_00001_LEFT_CC_1" / "c" / "d" / "1-2.png")
    tiny_image(tmp_path / "jpeg" / "Mass-Training_P_00004_LEFT_MLO" / "1-1.jpg")
    tiny_image(tmp_path / "flat" / "Mass-Training_P_00004_RIGHT_MLO.png")
    # DICOM as written, once with a PNG conversion beside it and once alone.
    for case in calc_cases[:2]:
        dicom = tmp_path / cbis_paths(case)[0]
        dicom.parent.mkdir(parents=True)
        dicom.write_bytes(b"")
    tiny_image(tmp_path / "Calc-Test_P_00038_LEFT_CC" / "1-1.png")
    tiny_image(tmp_path / "Calc-Test_P_00041_LEFT_CC" / "1-1.png")
    tiny_image(tmp_path / "Calc-Test_P_00041_LEFT_CC" / "1-2.png")
    tiny_image(tmp_path / "other" / "stray.png")
    return tmp_path


def test_cbis_ddsm_one_record_per_mammogram(cbis_root):
    assert detect_format(cbis_root) == "cbis-ddsm"
    scan = read_dataset(cbis_root)
    records = by_id(scan)
    assert scan.label_names == ["benign", "malignant"] and not scan.multilabel
    assert {i: (r.labels[0], r.group, r.split) for i, r in records.items()} == {
        "Mass-Training_P_00001_LEFT_CC": ("malignant", "P_00001", "train"),
        "Mass-Training_P_00004_LEFT_MLO": ("malignant", "P_00004", "train"),
        "Mass-Training_P_00004_RIGHT_MLO": ("benign", "P_00004", "train"),
        "Calc-Test_P_00038_LEFT_CC": ("benign", "P_00038", "test"),
        "Calc-Test_P_00038_RIGHT_CC": ("malignant", "P_00038", "test"),
    }
    assert records["Mass-Training_P_00001_LEFT_CC"].source.endswith("LEFT_CC/a/b/1-1.png")
    assert records["Mass-Training_P_00004_RIGHT_MLO"].source.endswith(
        "flat/Mass-Training_P_00004_RIGHT_MLO.png")
    assert records["Calc-Test_P_00038_LEFT_CC"].source.endswith("Calc-Test_P_00038_LEFT_CC/1-1.png")
    assert records["Calc-Test_P_00038_RIGHT_CC"].source.endswith("000000.dcm")
    two = records["Mass-Training_P_00004_LEFT_MLO"].meta
    assert two["abnormality_count"] == 2 and two["pathology"] == ["BENIGN", "MALIGNANT"]
    assert two["breast_density"] == 3 and two["side"] == "LEFT" and two["view"] == "MLO"
    assert records["Calc-Test_P_00038_LEFT_CC"].meta["breast_density"] == 2
    assert records["Calc-Test_P_00038_LEFT_CC"].meta["calc_type"] == ["PUNCTATE"]
    assert kinds(scan) == {"missing-image": 1, "malformed-row": 1, "ambiguous-image": 1, "missing-label": 1}
    problems = {p.kind: p for p in scan.problems}
    assert problems["missing-image"].path == str(cbis_root / cbis_paths("Mass-Training_P_00009_RIGHT_CC")[0])
    assert "Mass-Training_P_00009_RIGHT_CC.*" in problems["missing-image"].reason
    assert "UNPROVEN" in problems["malformed-row"].reason
    assert "Calc-Test_P_00041_LEFT_CC" in problems["ambiguous-image"].reason
    assert problems["missing-label"].path.endswith("other/stray.png")
    json.dumps([r.meta for r in scan.records])


# --- CheXpert ---------------------------------------------------------------------------------

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                "Pleural Other", "Fracture", "Support Devices"]
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert_row(path: str, sex: str, age: int, view: str, projection: str, **values) -> dict:
    row = {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": view, "AP/PA": projection}
    return row | {name: values.get(name.replace(" ", "_"), "") for name in OBSERVATIONS}


def write_chexpert(folder: Path, prefix: str = "CheXpert-v1.0-small") -> Path:
    """A CheXpert-v1.0-small layout in folder: train.csv, valid.csv and a few tiny JPEGs."""
    train = [
        chexpert_row(f"{prefix}/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP",
                     No_Finding="1.0", Support_Devices="1.0"),
        chexpert_row(f"{prefix}/train/patient00001/study1/view2_lateral.jpg", "Female", 68, "Lateral", "",
                     Cardiomegaly="-1.0", Edema="1.0", Pleural_Effusion="0.0"),
        chexpert_row(f"{prefix}/train/patient00002/study2/view1_frontal.jpg", "Male", 87, "Frontal", "PA",
                     Edema="1.0"),
        chexpert_row(f"{prefix}/train/patient00003/study1/view1_frontal.jpg", "Male", 41, "Frontal", "AP",
                     Edema="maybe"),
    ]
    valid = [chexpert_row(f"{prefix}/valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal",
                          "AP", **{name.replace(" ", "_"): "0.0" for name in OBSERVATIONS}
                          | {"Cardiomegaly": "1.0", "Lung_Opacity": "1.0"})]
    write_csv(folder / "train.csv", CHEXPERT_HEADER, train)
    write_csv(folder / "valid.csv", CHEXPERT_HEADER, valid)
    for row in train[:2] + valid:
        tiny_image(folder / row["Path"].split("/", 1)[1])
    tiny_image(folder / "train" / "patient00005" / "study1" / "view1_frontal.jpg")
    return folder


@pytest.mark.parametrize("layout", ["parent", "dataset folder", "renamed folder"])
def test_chexpert_labels_uncertainty_groups_and_splits(tmp_path, layout):
    if layout == "renamed folder":
        root = folder = write_chexpert(tmp_path / "chexpert-copy")
    else:
        folder = write_chexpert(tmp_path / "CheXpert-v1.0-small")
        root = tmp_path if layout == "parent" else folder
    assert detect_format(root) == "chexpert"
    scan = read_dataset(root)
    assert scan.multilabel and scan.label_names == OBSERVATIONS and scan.root == str(folder)
    records = by_id(scan)
    assert list(records) == ["train/patient00001/study1/view1_frontal",
                             "train/patient00001/study1/view2_lateral",
                             "valid/patient64541/study1/view1_frontal"]
    frontal, lateral, valid = records.values()
    assert frontal.labels == ("No Finding", "Support Devices")
    assert lateral.labels == ("Edema",)  # uncertain Cardiomegaly counts as absent
    assert lateral.meta["Cardiomegaly"] == -1.0 and lateral.meta["Pleural Effusion"] == 0.0
    assert lateral.meta["Atelectasis"] is None and lateral.meta["AP/PA"] is None
    assert frontal.meta["Sex"] == "Female" and frontal.meta["Age"] == 68 and frontal.meta["AP/PA"] == "AP"
    assert valid.labels == ("Cardiomegaly", "Lung Opacity") and valid.split == "valid"
    assert (frontal.group, frontal.split, valid.group) == ("patient00001", "train", "patient64541")
    assert Path(frontal.source) == folder / "train/patient00001/study1/view1_frontal.jpg"
    assert kinds(scan) == {"missing-image": 1, "malformed-row": 1, "missing-label": 1}
    problems = {p.kind: p for p in scan.problems}
    assert problems["missing-image"].path.endswith("train/patient00002/study2/view1_frontal.jpg")
    assert "train.csv:4" in problems["missing-image"].reason
    assert problems["malformed-row"].path.endswith("train.csv:5")
    assert problems["missing-label"].path.endswith("patient00005/study1/view1_frontal.jpg")


# --- generic folder-per-class and CSV --------------------------------------------------------


@pytest.fixture
def ham_images():
    if not HAM.is_dir():
        pytest.skip(f"real dataset not found at {HAM}")
    return sorted((HAM / "HAM10000_images_part_1").glob("*.jpg"))[:6]


def test_folder_per_class(tmp_path, ham_images):
    copy(ham_images[0], tmp_path / "nevus" / "a.jpg")
    copy(ham_images[1], tmp_path / "nevus" / "B.JPEG")
    copy(ham_images[2], tmp_path / "melanoma" / "batch2" / "c.jpg")
    copy(ham_images[3], tmp_path / "melanoma" / ".thumbs" / "c.jpg")
    copy(ham_images[4], tmp_path / "stray.jpg")
    (tmp_path / "melanoma" / "empty.png").write_bytes(b"")
    (tmp_path / "melanoma" / "notes.txt").write_text("not an image")
    (tmp_path / "no-images").mkdir()

    assert detect_format(tmp_path) == "folder"
    scan = read_dataset(tmp_path)
    assert [(r.image_id, r.labels) for r in scan.records] == [
        ("melanoma/batch2/c.jpg", ("melanoma",)),
        ("melanoma/empty.png", ("melanoma",)),
        ("nevus/B.JPEG", ("nevus",)),
        ("nevus/a.jpg", ("nevus",)),
    ]
    assert scan.label_names == ["melanoma", "nevus"] and scan.name == "folder"
    assert [(p.kind, Path(p.path).name) for p in scan.problems] == [("missing-label", "stray.jpg")]
    assert read_dataset(tmp_path).records == scan.records


def test_path_label_csv(tmp_path, ham_images):
    for i, image in enumerate(ham_images[:4]):
        copy(image, tmp_path / "images" / f"{i}.jpg")
    absolute = copy(ham_images[4], tmp_path / "elsewhere" / "x.png")
    write_csv(tmp_path / "labels.csv", ["path", "label", "group", "site"], [
        ["images/0.jpg", "effusion|edema", "p1", "A"],
        ["images/1.jpg", "edema", "p1", "B"],
        ["images/2.jpg", "", "p2", ""],
        [str(absolute), "nodule", "", "C"],
        ["images/9.jpg", "edema", "p3", "A"],
        ["", "edema", "p3", "A"],
        ["images/1.jpg", "edema", "p1", "B"],
    ])
    # The images/ folder must not make the layout look like folder-per-class.
    assert detect_format(tmp_path) == detect_format(tmp_path / "labels.csv") == "csv"
    scan = read_dataset(tmp_path)
    assert scan.multilabel and scan.label_names == ["edema", "effusion", "nodule"]
    assert [(r.image_id, r.labels, r.group) for r in scan.records] == [
        ("images/0.jpg", ("effusion", "edema"), "p1"),
        ("images/1.jpg", ("edema",), "p1"),
        ("images/2.jpg", (), "p2"),
        (str(absolute), ("nodule",), None),
    ]
    assert scan.records[0].meta == {"site": "A"} and scan.records[3].source == str(absolute)
    assert [p.kind for p in scan.problems] == ["missing-image", "malformed-row", "duplicate"]
    assert scan.problems[0].path == str(tmp_path / "images" / "9.jpg")

    write_csv(tmp_path / "single" / "labels.csv", ["path", "label"],
              [["../images/0.jpg", "a"], ["../images/1.jpg", ""]])
    single = read_dataset(tmp_path / "single" / "labels.csv")
    assert not single.multilabel and [r.labels for r in single.records] == [("a",)]
    assert [p.reason for p in single.problems] == ["empty label"]
