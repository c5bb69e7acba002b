"""DICOM on real images: the pixel pipeline against pydicom's own LUT functions, the dicom
reader (tags kept and never kept, DICOMDIR), bad files, label joins, search by a .dcm file."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mediret.cli import cli
from mediret.datasets import detect_format, read_dataset
from mediret.datasets.dicom import KEPT_TAGS
from mediret.datasets.labels import join_labels
from mediret.dicom import WINDOW_PRESETS, DicomError, DicomOptions, parse_window, read_pixels
from mediret.errors import DatasetFormatError, StoreError
from mediret.ingest import ingest
from mediret.sources import decode_image, open_source
from mediret.store import Store

from .conftest import HAM, MEDMNIST, ThumbnailEncoder, requires_data

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import (apply_modality_lut, apply_voi_lut, apply_windowing,  # noqa: E402
                            convert_color_space, get_encoder)
from pydicom.uid import (JPEG2000Lossless, JPEGLSLossless, CTImageStorage,  # noqa: E402
                         ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage,
                         generate_uid)

pytestmark = requires_data

# What identifying tags the test files carry: none of these values may reach a store.
IDENTITY = {
    "PatientName": "Doe^Jane", "PatientBirthDate": "19610412", "PatientAddress": "12 Harbour Road",
    "PatientTelephoneNumbers": "+44 20 7946 0018", "OtherPatientIDs": "OLD-99817",
    "InstitutionName": "St Elsewhere General", "ReferringPhysicianName": "House^Gregory",
    "PerformingPhysicianName": "Quinn^Michaela", "InstitutionAddress": "1 Hospital Way",
}


# --- real images and DICOM files made from them ------------------------------------------


def ham_rgb(index: int, size=(150, 112)) -> np.ndarray:
    """The index-th HAM10000 image (sorted), shrunk: a real RGB photograph."""
    path = sorted((HAM / "HAM10000_images_part_1").glob("*.jpg"))[index]
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BILINEAR))


def ham_grey(index: int) -> np.ndarray:
    return np.asarray(Image.fromarray(ham_rgb(index)).convert("L"))


def pneumonia(index: int) -> np.ndarray:
    with np.load(MEDMNIST) as arrays:
        return arrays["test_images"][index]


def make_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8,
               sop_class=SecondaryCaptureImageStorage, **tags) -> FileDataset:
    """A Part-10 dataset holding ``pixels`` as stored values, with ``tags`` and IDENTITY set."""
    uid = tags.pop("SOPInstanceUID", None) or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", None) or generate_uid()
    ds.SeriesInstanceUID = tags.pop("SeriesInstanceUID", None) or generate_uid()
    ds.PatientID = tags.pop("PatientID", "MRN-000417")
    for keyword, value in {**IDENTITY, **tags}.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def to_bytes(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def lut_item(table: np.ndarray, first: int, bits: int, vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table), first, bits])  # LUT Descriptor
    data = [int(v) for v in table] if vr == "US" else table.astype("<u2").tobytes()
    item.add_new(0x00283006, vr, data)  # LUT Data
    return item


def ct_file(index: int = 0, **tags) -> FileDataset:
    """A real image as a 12-bit CT slice: stored = 16 * grey, HU = 0.5 * stored - 1024."""
    stored = ham_grey(index).astype(np.uint16) * 16
    return make_dicom(stored, bits_stored=12, sop_class=CTImageStorage, Modality="CT",
                      RescaleSlope=0.5, RescaleIntercept=-1024, **tags)


def window_reference(ds, window=None) -> np.ndarray:
    """pydicom's modality LUT and windowing, its output range (PS3.3 C.11.2.1.2) scaled to 0..255."""
    if window is not None:
        ds = ds.copy()
        ds.WindowCenter, ds.WindowWidth = window
    hu = apply_modality_lut(ds.pixel_array, ds)
    shown = apply_windowing(hu, ds)
    y_min = float(ds.RescaleIntercept)
    y_max = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return (shown - y_min) / (y_max - y_min) * 255


def assert_close(got: np.ndarray, expected: np.ndarray, tolerance: float = 0.5001) -> None:
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(np.float64) - expected).max() <= tolerance


# --- grey pipeline: modality LUT, VOI LUT / window, MONOCHROME1 -------------------------------


def test_window_covering_the_stored_range_gives_back_the_real_image():
    grey = ham_grey(0)
    # Stored 16 * grey on 12 bits; LINEAR maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto 0..255,
    # so centre 2040.5 and width 4081 give back 16 * grey / 4080 * 255 = grey.
    ds = make_dicom(grey.astype(np.uint16) * 16, bits_stored=12, WindowCenter=2040.5, WindowWidth=4081)
    assert np.array_equal(read_pixels(to_bytes(ds)), grey)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_rescale_and_file_window_match_pydicom(photometric):
    ds = ct_file(1, WindowCenter=[40, 400], WindowWidth=[400, 2000])  # first window is used
    ds.PhotometricInterpretation = photometric
    expected = window_reference(ds)  # index 0: the first window
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    got = read_pixels(to_bytes(ds))
    assert_close(got, expected)
    assert 0 < (got == (255 if photometric == "MONOCHROME2" else 0)).mean() < 0.9  # a real window clips


def test_window_override_and_presets_beat_the_files_window():
    ds = ct_file(2, WindowCenter=40, WindowWidth=80)
    data = to_bytes(ds)
    lung = read_pixels(data, DicomOptions(window=parse_window("lung")))
    assert parse_window("lung") == WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert_close(lung, window_reference(ds, (-600, 1500)))
    assert_close(read_pixels(data, DicomOptions(window=parse_window("-300,900"))),
                 window_reference(ds, (-300, 900)))
    hu = 0.5 * ds.pixel_array.astype(np.float64) - 1024
    assert_close(read_pixels(data, DicomOptions(window="minmax")),
                 (hu - hu.min()) / (hu.max() - hu.min()) * 255)
    assert not np.array_equal(lung, read_pixels(data))
    for bad in ("lungs", "40", "40,0", "a,b"):
        with pytest.raises(DicomError):
            parse_window(bad)


def test_high_bit_depth_stays_float_until_the_end():
    """Two stored values 1 apart in 16 bits stay apart through a narrow window (no early 8-bit step)."""
    grey = pneumonia(0).astype(np.uint16)
    stored = grey * 256 + 7  # 16-bit values; a min-max to 8 bits first would keep only `grey`
    ds = make_dicom(stored, bits_stored=16, RescaleSlope=1, RescaleIntercept=0,
                    WindowCenter=float(np.median(stored)), WindowWidth=600)
    expected = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds) / 65535 * 255
    assert_close(read_pixels(to_bytes(ds)), expected)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_to_the_window(vr):
    grey = ham_grey(3)
    stored = grey.astype(np.uint16) * 8 + 100  # 100 .. 2140
    first, entries = 90, 2100  # values past the table's end take its last entry
    table = np.rint(4095 * (np.arange(entries) / (entries - 1)) ** 0.5).astype(np.uint16)
    ds = make_dicom(stored, bits_stored=12, WindowCenter=1000, WindowWidth=10)
    ds.VOILUTSequence = [lut_item(table, first, 12, vr)]
    looked_up = table[np.clip(stored.astype(np.int64) - first, 0, entries - 1)]
    expected = looked_up / table.max() * 255
    assert_close(read_pixels(to_bytes(ds)), expected)
    assert np.array_equal(apply_voi_lut(ds.pixel_array, ds), looked_up)  # pydicom agrees on the lookup


def test_an_8_bit_voi_lut_of_4096_entries_is_looked_up_whole():
    """pydicom 3.0.2's apply_voi wraps such a LUT's indices at 256; the pipeline must not."""
    grey = pneumonia(2).astype(np.uint16)
    stored = grey * 16  # 0 .. 4080
    table = (np.arange(4096) // 16).astype(np.uint8)  # the identity back to `grey`, on 8 bits
    ds = make_dicom(stored, bits_stored=12)
    ds.VOILUTSequence = [lut_item(table, 0, 8)]
    assert_close(read_pixels(to_bytes(ds)), grey / table.max() * 255)


def test_modality_lut_sequence_then_min_max():
    grey = pneumonia(1).astype(np.uint16)
    table = (np.arange(256) ** 2 // 16).astype(np.uint16)  # a non-linear modality LUT
    ds = make_dicom(grey, bits_stored=8)
    ds.ModalityLUTSequence = [lut_item(table, 0, 16)]
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    assert np.array_equal(values, table[grey])
    assert_close(read_pixels(to_bytes(ds)), (values - values.min()) / (values.max() - values.min()) * 255)


# --- colour, frames, compression ---------------------------------------------------------------


def test_rgb_and_ybr_full_read_as_rgb():
    rgb = ham_rgb(4)
    assert np.array_equal(read_pixels(to_bytes(make_dicom(rgb, "RGB"))), rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    got = read_pixels(to_bytes(make_dicom(ybr, "YBR_FULL")))
    assert np.array_equal(got, convert_color_space(ybr, "YBR_FULL", "RGB"))
    assert np.abs(got.astype(int) - rgb).max() <= 3  # back to the photograph, within rounding


def shipped(name: str) -> Path:
    """A test file pydicom's wheel ships (never downloaded: the tests run offline)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's wheel here does not ship {name}")
    return Path(path)


@pytest.mark.parametrize("name,frame", [
    ("SC_ybr_full_422_uncompressed.dcm", 0),  # YBR_FULL_422, native
    ("examples_ybr_color.dcm", 15),  # JPEG baseline YBR_FULL_422, 30 frames: the middle one
    ("SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG Lossless
    ("examples_jpeg2k.dcm", 0),  # JPEG 2000, YBR_RCT
])
def test_pydicoms_colour_files_match_its_own_rgb(name, frame):
    path = shipped(name)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array  # pydicom converts YBR to RGB itself
    expected = expected[frame] if expected.ndim == 4 else expected
    assert np.array_equal(read_pixels(path.read_bytes()), expected)


def test_pydicoms_compressed_mr_reads_like_the_uncompressed_one():
    reference = read_pixels(shipped("MR_small.dcm").read_bytes())
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    assert_close(reference, np.clip((apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
                                     + 32768) / 65535 * 255, 0, 255))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(read_pixels(shipped(name).read_bytes()), reference), name


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless],
                         ids=["rle", "jpeg2000", "jpeg-ls"])
def test_compressed_files_read_as_the_native_one(syntax):
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no {syntax.name} encoder here: {encoder.missing_dependencies}")
    ds = ct_file(5, WindowCenter=40, WindowWidth=400)
    native = read_pixels(to_bytes(ds))
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(read_pixels(to_bytes(ds)), native)


def test_multiframe_reads_the_middle_frame_or_the_one_asked_for():
    frames = np.stack([pneumonia(i) for i in range(4)])  # four different real images
    ds = make_dicom(frames, bits_stored=8)
    assert ds.NumberOfFrames == 4
    data = to_bytes(ds)

    def stretched(image):
        image = image.astype(np.float64)
        return (image - image.min()) / (image.max() - image.min()) * 255

    assert_close(read_pixels(data), stretched(frames[2]))  # middle of 4: frame 3 (index 2)
    assert_close(read_pixels(data, DicomOptions(frame=1)), stretched(frames[0]))
    assert_close(read_pixels(data, DicomOptions(frame=4)), stretched(frames[3]))
    with pytest.raises(DicomError, match="has 4 frames; frame 5"):
        read_pixels(data, DicomOptions(frame=5))
    single = to_bytes(make_dicom(frames[1], bits_stored=8))
    assert_close(read_pixels(single, DicomOptions(frame=3)), stretched(frames[1]))  # single frame: read


def test_decode_image_and_open_source_use_the_same_pipeline(tmp_path):
    ds = ct_file(6, WindowCenter=40, WindowWidth=400)
    path = save(ds, tmp_path / "IM000001")  # no extension, as PACS exports name files
    options = DicomOptions(window=(-600, 1500))
    expected = read_pixels(path.read_bytes(), options)
    assert np.array_equal(np.asarray(open_source(str(path), dicom=options)), expected)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes(), str(path), options)), expected)
    assert open_source(str(path)).mode == "L"


def test_options_round_trip_through_store_info():
    for options in (DicomOptions(), DicomOptions(window=(-600, 1500), frame=3),
                    DicomOptions(window="minmax")):
        info = options.to_info()
        assert DicomOptions.from_info(info.get) == options
    assert DicomOptions.from_info({}.get) == DicomOptions()
    assert DicomOptions(window=(40, 80)).to_info() == {"dicom_window": "40,80", "dicom_frame": "middle"}


# --- the dicom reader ----------------------------------------------------------------------------


def hospital_export(root: Path, n: int = 4) -> list[FileDataset]:
    """n CT slices of two patients as a PACS export: nested folders, no extensions, plus a DICOMDIR."""
    from pydicom.fileset import FileSet

    datasets = []
    for i in range(n):
        ds = ct_file(i, PatientID=f"MRN-{i % 2}", WindowCenter=40, WindowWidth=400,
                     BodyPartExamined="CHEST", ViewPosition="", Manufacturer="Acme Medical",
                     StudyDate="20240102", PatientSex="F", PatientAge="061Y", Laterality="L",
                     StudyTime="101500", StudyID="1", SeriesNumber=1, InstanceNumber=i + 1)
        datasets.append(ds)
    fileset = FileSet()
    for ds in datasets:
        fileset.add(ds)
    fileset.write(root)
    return datasets


def test_dicom_folder_is_detected_and_read_with_kept_tags_only(tmp_path):
    datasets = hospital_export(tmp_path / "export")
    assert (tmp_path / "export" / "DICOMDIR").is_file()
    assert detect_format(tmp_path / "export") == "dicom"
    assert detect_format(tmp_path / "export" / "DICOMDIR") == "dicom"
    scan = read_dataset(tmp_path / "export")
    assert scan.name == "dicom" and scan.problems == []
    assert all("." not in Path(r.source).name for r in scan.records)  # extension-less files
    by_uid = {r.image_id: r for r in scan.records}
    assert set(by_uid) == {str(ds.SOPInstanceUID) for ds in datasets}
    for ds in datasets:
        record = by_uid[str(ds.SOPInstanceUID)]
        assert record.group == ds.PatientID and record.labels == ()
        assert record.meta["StudyInstanceUID"] == ds.StudyInstanceUID
        assert record.meta["Modality"] == "CT" and record.meta["PatientAge"] == "061Y"
        assert record.meta["Rows"] == 112 and record.meta["window"] == "40,400"
        assert record.meta["rescale"] == [0.5, -1024.0]
        assert set(record.meta) <= {*KEPT_TAGS, "window", "rescale"}
        text = json.dumps(record.meta)
        for value in (*IDENTITY.values(), ds.PatientID):
            assert value not in text
    grouped = read_dataset(tmp_path / "export", group_tag="StudyInstanceUID",
                           keep_tags=("PatientName", "InstitutionName"))
    record = next(r for r in grouped.records if r.image_id == str(datasets[0].SOPInstanceUID))
    assert record.group == datasets[0].StudyInstanceUID
    assert record.meta["PatientName"] == "Doe^Jane" and record.meta["InstitutionName"] == IDENTITY["InstitutionName"]
    with pytest.raises(DatasetFormatError, match="not a DICOM attribute keyword"):
        read_dataset(tmp_path / "export", keep_tags=("PatientsName",))
    with pytest.raises(DatasetFormatError, match="group_tag apply to dicom datasets"):
        read_dataset(MEDMNIST, group_tag="PatientID")


def test_dicomdir_entries_whose_files_are_gone_and_duplicates_are_reported(tmp_path):
    hospital_export(tmp_path / "export")
    files = sorted(p for p in (tmp_path / "export").rglob("*") if p.is_file() and p.name != "DICOMDIR")
    files[0].unlink()
    shutil.copy(files[1], tmp_path / "export" / "copy-of-one")
    scan = read_dataset(tmp_path / "export")
    assert len(scan.records) == 3
    missing, duplicate = sorted(scan.problems, key=lambda p: p.kind, reverse=True)
    assert (missing.kind, missing.path) == ("missing-image", str(files[0]))
    assert duplicate.kind == "duplicate"
    assert {duplicate.path, duplicate.reason.split("same SOPInstanceUID as ")[1].split(";")[0]} == {
        str(files[1]), str(tmp_path / "export" / "copy-of-one")}


def test_a_folder_is_dicom_when_most_of_its_files_are(tmp_path):
    from mediret.datasets import dicom

    save(ct_file(0), tmp_path / "a" / "one.dcm")
    for i in range(3):
        Image.fromarray(ham_rgb(i)).save(tmp_path / "a" / f"{i}.png")
    assert not dicom.detect(tmp_path / "a")
    for i in range(1, 4):
        save(ct_file(i), tmp_path / "a" / "deeper" / f"{i}")
    assert dicom.detect(tmp_path / "a")


# --- bad files -------------------------------------------------------------------------------------


def bad_dicom_folder(root: Path) -> dict[str, Path]:
    """Three good CT files and, beside them, a truncated one, one without pixels, one in an
    unknown transfer syntax, one whose header is cut and a text file."""
    for i in range(3):
        save(ct_file(i, WindowCenter=40, WindowWidth=400), root / "good" / f"IM{i}")
    bad = {}
    (root / "bad").mkdir()
    data = to_bytes(ct_file(3))
    bad["truncated"] = root / "bad" / "truncated"
    bad["truncated"].write_bytes(data[: len(data) - 5000])
    report = make_dicom(pneumonia(0), sop_class="1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(report, keyword)
    bad["no-pixels"] = save(report, root / "bad" / "report")
    bad["syntax"] = root / "bad" / "private-syntax"
    bad["syntax"].write_bytes(to_bytes(ct_file(4)).replace(b"1.2.840.10008.1.2.1\0",
                                                           b"1.2.826.0.1.99999.7\0"))
    bad["header"] = root / "bad" / "cut-header"
    bad["header"].write_bytes(data[:300])
    (root / "bad" / "README.TXT").write_text("exported by a PACS")
    return bad


def test_bad_dicoms_are_reported_with_path_and_reason_and_the_rest_ingested(tmp_path):
    bad = bad_dicom_folder(tmp_path / "d")
    scan = read_dataset(tmp_path / "d")
    report = ingest(scan, tmp_path / "s", ThumbnailEncoder(), progress=False, workers=0)
    assert report.added == 3
    reasons = {p.path: (p.kind, p.reason) for p in report.problems}
    assert reasons[str(bad["no-pixels"])] == ("no-pixel-data", "no pixel data (SOP class Basic Text SR Storage)")
    assert reasons[str(bad["syntax"])][0] == "unreadable-image"
    assert "1.2.826.0.1.99999.7" in reasons[str(bad["syntax"])][1]
    assert reasons[str(bad["truncated"])][0] == "unreadable-image"
    assert "DICOM: cannot decode the pixel data" in reasons[str(bad["truncated"])][1]
    assert reasons[str(bad["header"])] == ("unreadable-image", "no SOP Class UID and no pixel data: "
                                           "is the file cut short?")
    assert set(reasons) == {str(p) for p in bad.values()}  # README.TXT is not DICOM: not a problem
    with Store.open(tmp_path / "s") as store:
        assert len(store) == 3


def test_a_cbis_ddsm_dicom_goes_through_the_same_pipeline(tmp_path):
    from mediret.datasets.cbis_ddsm import LABEL_FILE_PATTERN  # noqa: F401  (the layout below is its)

    case = "Mass-Training_P_00001_LEFT_CC"
    mammogram = make_dicom(ham_grey(7).astype(np.uint16) * 64, "MONOCHROME1", 14, Modality="MG",
                           WindowCenter=6000, WindowWidth=9000)
    path = save(mammogram, tmp_path / case / "1.3.6.1" / "1.3.6.2" / "000000.dcm")
    with open(tmp_path / "mass_case_description_train_set.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "breast_density", "left or right breast", "image view",
                         "abnormality id", "abnormality type", "mass shape", "mass margins",
                         "assessment", "pathology", "subtlety", "image file path",
                         "cropped image file path", "ROI mask file path"])
        writer.writerow(["P_00001", 3, "LEFT", "CC", 1, "mass", "OVAL", "SPICULATED", 4,
                         "MALIGNANT", 4, f"{case}/1.3.6.1/1.3.6.2/000000.dcm", "", ""])
    scan = read_dataset(tmp_path)
    assert scan.name == "cbis-ddsm" and [r.source for r in scan.records] == [str(path)]
    options = DicomOptions(window=(5000, 4000))
    encoder = ThumbnailEncoder()
    ingest(scan, tmp_path / "s", encoder, progress=False, workers=0, dicom=options)
    expected = encoder.embed_pixels(encoder.preprocess.pixels(
        Image.fromarray(read_pixels(path.read_bytes(), options)))[None])
    with Store.open(tmp_path / "s") as store:
        assert np.allclose(store.vectors([0]), expected, atol=1e-6)
        assert DicomOptions.from_info(store.get_info) == options
    with pytest.raises(StoreError, match="read with --window 5000,4000 --frame middle"):
        ingest(scan, tmp_path / "s", encoder, progress=False, workers=0)


# --- labels from a CSV, through the CLI --------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_cli_labels_joined_on_a_study_uid_multilabel(tmp_path, monkeypatch):
    monkeypatch.setattr("mediret.encoders.load_encoder", lambda *a, **k: ThumbnailEncoder())
    datasets = hospital_export(tmp_path / "export")
    studies = [str(ds.StudyInstanceUID) for ds in datasets]
    labels = write_csv(tmp_path / "findings.csv", ["StudyInstanceUID", "finding"], [
        [studies[0], "nodule|effusion"], [studies[1], "normal"], [studies[2], "nodule"],
        ["1.2.3.4.5", "normal"],  # no such study
    ])  # studies[3] has no row
    result = CliRunner().invoke(cli, [
        "ingest", str(tmp_path / "export"), "--store", str(tmp_path / "s"), "-q",
        "--labels", str(labels), "--on", "StudyInstanceUID", "--label-column", "finding"])
    assert result.exit_code == 0, result.output
    assert "3 added" in result.output
    assert f"missing-image: {labels}:5: StudyInstanceUID '1.2.3.4.5' matches no image" in result.output
    assert "missing-label: " in result.output and f"StudyInstanceUID '{studies[3]}'" in result.output
    with Store.open(tmp_path / "s") as store:
        assert store.get_info("multilabel") == "true"
        got = {row[0]: sorted(row[1].split(",")) for row in store.sql(
            "SELECT i.image_id, string_agg(l.label, ',') FROM images i JOIN labels l USING (id) "
            "GROUP BY i.image_id")}
        text = " ".join(str(v) for row in store.sql("SELECT * FROM images") for v in row)
        kept = store.sql("SELECT group_id FROM images")
    assert got == {str(datasets[0].SOPInstanceUID): ["effusion", "nodule"],
                   str(datasets[1].SOPInstanceUID): ["normal"],
                   str(datasets[2].SOPInstanceUID): ["nodule"]}
    for value in IDENTITY.values():
        assert value not in text
    assert {k[0] for k in kept} == {"MRN-0", "MRN-1"}  # the group: PatientID, as asked by default


def test_cli_keep_tag_and_patient_id_join(tmp_path, monkeypatch):
    monkeypatch.setattr("mediret.encoders.load_encoder", lambda *a, **k: ThumbnailEncoder())
    hospital_export(tmp_path / "export")
    labels = write_csv(tmp_path / "p.csv", ["PatientID", "label"], [["MRN-0", "sick"], ["MRN-1", "well"]])
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(tmp_path / "export"), "-s", str(tmp_path / "s"), "-q",
                                 "--labels", str(labels), "--on", "PatientID",
                                 "--keep-tag", "PatientName", "--window", "lung", "--frame", "1"])
    assert result.exit_code == 0, result.output
    with Store.open(tmp_path / "s") as store:
        rows = store.sql("SELECT i.group_id, l.label, i.meta FROM images i JOIN labels l USING (id)")
        assert store.get_info("dicom_window") == "-600,1500" and store.get_info("dicom_frame") == "1"
    assert {(g, label) for g, label, _ in rows} == {("MRN-0", "sick"), ("MRN-1", "well")}
    assert all(json.loads(meta)["PatientName"] == "Doe^Jane" for _, _, meta in rows)
    assert all("PatientBirthDate" not in json.loads(meta) for _, _, meta in rows)
    result = runner.invoke(cli, ["ingest", str(tmp_path / "export"), "-s", str(tmp_path / "t"),
                                 "--on", "PatientID"])
    assert result.exit_code == 2 and "give --labels FILE too" in result.output
    result = runner.invoke(cli, ["ingest", str(tmp_path / "export"), "-s", str(tmp_path / "t"),
                                 "--window", "lungs"])
    assert result.exit_code == 2 and "CENTRE,WIDTH" in result.output
    result = runner.invoke(cli, ["ingest", str(tmp_path / "export"), "-s", str(tmp_path / "t"),
                                 "--labels", str(labels), "--on", "AccessionNumber"])
    assert result.exit_code == 1 and "valid keys: image_id, path, group, PatientID" in result.output
    assert "Traceback" not in result.output


def test_join_labels_applies_to_any_format_by_path(ham_subset):
    root, rows = ham_subset
    scan = read_dataset(root)
    chosen = scan.records[:5]
    relative = [Path(r.source).relative_to(root).as_posix() for r in chosen]
    labels = write_csv(root.parent / "relabel.csv", ["path", "label"],
                       [[p, "a|b" if i == 0 else "c"] for i, p in enumerate(relative)]
                       + [[relative[1], "d"]])  # a second row for the same image
    joined = join_labels(scan, labels, "path")
    assert [r.image_id for r in joined.records] == [r.image_id for r in chosen]
    assert joined.records[0].labels == ("a", "b") and joined.records[1].labels == ("c",)
    assert joined.multilabel and joined.label_names == ["a", "b", "c"]
    problems = [p for p in joined.problems if p not in scan.problems]
    assert sum(p.kind == "missing-label" for p in problems) == len(scan.records) - 5
    assert [p.kind for p in problems if p.kind != "missing-label"] == ["duplicate"]


# --- the real encoder: search by a .dcm file -----------------------------------------------------------


@pytest.mark.slow
def test_search_by_a_dcm_file_finds_the_stored_image(tmp_path, efficientnet_lite0):
    from mediret.query import QueryEncoder, query_from_file

    root = tmp_path / "export"
    files = [save(ct_file(i, WindowCenter=40, WindowWidth=400), root / f"IM{i:04d}") for i in range(5)]
    files.append(save(make_dicom(ham_rgb(5), "RGB"), root / "colour" / "IM0005"))
    options = DicomOptions(window=(-800, 1000))
    report = ingest(read_dataset(root, dicom=options), tmp_path / "s", efficientnet_lite0,
                    progress=False, dicom=options)
    assert report.added == 6 and report.problems == []
    result = CliRunner().invoke(cli, ["search", str(files[5]), "-k", "3", "--store",
                                      str(tmp_path / "s"), "--format", "json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output[result.output.index("{"):])["hits"]
    assert hits[0]["source"] == str(files[5]) and hits[0]["score"] > 0.9999
    # A grey file read with the store's recorded window embeds to its stored vector.
    with Store.open(tmp_path / "s") as store:
        recorded = DicomOptions.from_info(store.get_info)
        assert recorded == options
        embedder = QueryEncoder(store, encoder=efficientnet_lite0)
        query = embedder.embed_image(open_source(str(files[2]), dicom=recorded))
        stored = store.vectors([store.id_of(str(pydicom.dcmread(files[2]).SOPInstanceUID))])[0]
        default = embedder.embed_image(open_source(str(files[2])))
        # the query path reads a file with the store's recorded options by itself
        np.testing.assert_allclose(query_from_file(store, str(files[2]), encoder=embedder).vector, query,
                                   atol=1e-6)
    cosine = float(query @ stored / np.linalg.norm(query) / np.linalg.norm(stored))
    assert cosine > 0.9999
    assert float(default @ stored / np.linalg.norm(default) / np.linalg.norm(stored)) < cosine
