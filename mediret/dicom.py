"""A DICOM file's bytes -> the 8-bit image a viewer would show: modality LUT, VOI LUT or window,
photometric interpretation, one frame.

The steps follow the DICOM grayscale pipeline (PS3.4 N.2.1, PS3.3 C.11), with
pydicom 3 doing each one (``pydicom.pixels``):

1. decode one frame (``--frame N``, counted from 1 as DICOM counts frames; by
   default the middle one, ``n // 2 + 1`` of n) through pydicom's pixel-data
   plugins, so compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE)
   read as native ones do;
2. grey images: the modality LUT (Rescale Slope/Intercept, or the Modality LUT
   Sequence), in float64;
3. then the VOI: a window given by the user (``DicomOptions.window``, centre
   and width in modality units, e.g. HU, or a named preset of ``WINDOW_PRESETS``),
   else the file's VOI LUT Sequence (its first LUT, output scaled over the
   table's own lowest..highest entry), else the file's first Window
   Center/Width (with its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID),
   else, with neither (or ``window="minmax"``), the image's own lowest..highest
   modality value;
4. MONOCHROME1 (low values bright) is inverted;
5. colour images: RGB as stored (JPEG 2000's YBR_ICT / YBR_RCT decode to it),
   YBR_FULL / YBR_FULL_422 converted to RGB (``convert_color_space``), PALETTE
   COLOR through its LUT; scaled from their bit depth; no window applies;
6. values stay float until the one conversion to 8 bits at the end.

Anything that cannot be read this way (not DICOM, no pixel data, a transfer
syntax without a decoder here, a truncated file) raises ``DicomError`` naming why.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from .errors import MediretError

# CT windows in Hounsfield units, (centre, width): the values in Radiopaedia's
# "Windowing (CT)" article (radiopaedia.org/articles/windowing-ct): brain W:80 L:40,
# lungs W:1500 L:-600, mediastinum W:350 L:50, abdomen soft tissues W:400 L:50,
# bone W:1800 L:400. They mean something only for images whose modality LUT
# gives HU (CT); mammograms, radiographs and MR have no such fixed scale, which
# is why there is no "mammo" preset: a For Presentation mammogram carries its
# own window or VOI LUT (PS3.3 C.8.11.3, required there), the default here.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft-tissue": (50.0, 400.0),
}
# Window choices that are not a fixed centre/width.
FILE_WINDOW, MINMAX_WINDOW = "file", "minmax"

_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# JPEG 2000's component transforms: the decoder reverses them, handing back RGB.
_J2K_COLOUR = ("YBR_ICT", "YBR_RCT")


class DicomError(MediretError, OSError):
    """A DICOM file whose pixels cannot be read, with why (an OSError, as PIL's unreadable files are)."""


@dataclass(frozen=True)
class DicomOptions:
    """The settings that change a DICOM file's pixels; a store records them so queries read alike.

    window: (centre, width) in modality units, or ``"file"`` (the file's VOI LUT
        or first window, else min..max) or ``"minmax"`` (always min..max).
    frame: the frame of multi-frame files, from 1; None: the middle one.
        Single-frame files are read whatever it says.
    """

    window: tuple[float, float] | str = FILE_WINDOW
    frame: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.window, str):
            if self.window not in (FILE_WINDOW, MINMAX_WINDOW):
                raise DicomError(f"window {self.window!r} is neither 'file', 'minmax' nor a centre,width")
        elif not self.window[1] >= 1:
            raise DicomError(f"window width must be at least 1, got {self.window[1]:g}")
        if self.frame is not None and self.frame < 1:
            raise DicomError(f"frames count from 1; got frame {self.frame}")

    def to_info(self) -> dict[str, str]:
        """The store_info rows that record these options (``dicom_window``, ``dicom_frame``)."""
        window = self.window if isinstance(self.window, str) else f"{self.window[0]:g},{self.window[1]:g}"
        return {"dicom_window": window,
                "dicom_frame": "middle" if self.frame is None else str(self.frame)}

    @classmethod
    def from_info(cls, get_info: Callable[[str], str | None]) -> DicomOptions:
        """The options a store recorded (``Store.get_info``); defaults where it recorded none."""
        window = get_info("dicom_window") or FILE_WINDOW
        frame = get_info("dicom_frame") or "middle"
        return cls(window=parse_window(window), frame=None if frame == "middle" else int(frame))


def parse_window(text: str) -> tuple[float, float] | str:
    """``--window``: a preset name, ``file``, ``minmax``, or ``CENTRE,WIDTH`` (e.g. ``-600,1500``)."""
    text = text.strip().lower()
    if text in (FILE_WINDOW, MINMAX_WINDOW):
        return text
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    centre, sep, width = text.partition(",")
    try:
        window = (float(centre), float(width))
    except ValueError:
        window = None
    if not sep or window is None:
        raise DicomError(f"window {text!r} is not CENTRE,WIDTH (e.g. -600,1500) nor one of: "
                         f"{', '.join([FILE_WINDOW, MINMAX_WINDOW, *sorted(WINDOW_PRESETS)])}")
    DicomOptions(window=window)  # checks the width
    return window


class Voi(NamedTuple):
    """The VOI step a grey image gets: ``window`` (centre, width, function), ``voi-lut`` or ``minmax``."""

    kind: str
    centre: float | None = None
    width: float | None = None
    function: str = "LINEAR"

    def describe(self) -> str:
        if self.kind != "window":
            return self.kind
        suffix = "" if self.function == "LINEAR" else f" {self.function}"
        return f"{self.centre:g},{self.width:g}{suffix}"


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` starts as a DICOM Part-10 file: 128 bytes of preamble, then ``DICM``."""
    return data[128:132] == b"DICM"


def read_dataset(data: bytes):
    """The pydicom Dataset of a DICOM file's bytes; DicomError when it is not one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise DicomError(f"not a readable DICOM file: {exc}") from exc


def decodable_problem(ds) -> tuple[str, str] | None:
    """Why ``ds`` (its tags, pixels not needed) has no pixels to read here, as (problem kind,
    reason), or None. Kinds: 'no-pixel-data' (a report, a presentation state, ...),
    'unreadable-image' (cut short, no decoder, an unsupported photometric interpretation).

    Cheap: looks at the tags and the transfer syntax only, so a reader can
    report such files without decoding them.
    """
    from pydicom.pixels import get_decoder

    if not any(keyword in ds for keyword in _PIXEL_DATA) and not ("Rows" in ds and "Columns" in ds):
        if "SOPClassUID" not in ds:  # Type 1 in every IOD: the file stops before its dataset does
            return "unreadable-image", "no SOP Class UID and no pixel data: is the file cut short?"
        sop = getattr(ds.SOPClassUID, "name", None) or ds.SOPClassUID
        return "no-pixel-data", f"no pixel data (SOP class {sop})"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return "unreadable-image", "no Transfer Syntax UID in the file meta information"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        named = f" ({syntax.name})" if syntax.name != str(syntax) else " (not one pydicom knows)"
        return "unreadable-image", f"transfer syntax {syntax}{named} has no pixel-data decoder in pydicom"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        return ("unreadable-image",
                f"transfer syntax {syntax.name} needs a pixel-data plugin that is not installed: {missing}")
    photometric = ds.get("PhotometricInterpretation")
    if photometric is not None and photometric not in (*_GREY, *_COLOUR, *_J2K_COLOUR):
        return "unreadable-image", (f"photometric interpretation {photometric} is not supported "
                                    f"({', '.join(_GREY + _COLOUR + _J2K_COLOUR)} are)")
    return None


def frame_index(ds, options: DicomOptions) -> int:
    """The 0-based frame ``options`` picks in ``ds``; DicomError when the file has fewer."""
    from pydicom.pixels.utils import get_nr_frames

    frames = get_nr_frames(ds, warn=False)
    if frames == 1:
        return 0
    if options.frame is None:
        return frames // 2
    if options.frame > frames:
        raise DicomError(f"has {frames} frames; frame {options.frame} was asked for")
    return options.frame - 1


def voi_choice(ds, options: DicomOptions) -> Voi:
    """The VOI step a grey image gets under ``options``: from the tags alone (see the module's steps)."""
    if not isinstance(options.window, str):
        return Voi("window", *options.window)
    if options.window == MINMAX_WINDOW:
        return Voi("minmax")
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        return Voi("voi-lut")
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if centre is None or width is None or function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return Voi("minmax")
    # A window the standard does not allow (LINEAR needs a width of at least 1, the others
    # above 0) says nothing usable: show the image's own range rather than refuse it.
    if width < 1 if function == "LINEAR" else width <= 0:
        return Voi("minmax")
    return Voi("window", centre, width, function)


def _first(value) -> float | None:
    """A Window Center/Width value: its first entry when it holds several (alternative views)."""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def read_pixels(data: bytes, options: DicomOptions | None = None) -> np.ndarray:
    """A DICOM file's displayed pixels: uint8, (rows, columns) for grey or (rows, columns, 3) for colour.

    See the module docstring for the steps; ``options`` defaults to the file's
    own window and the middle frame.
    """
    options = options or DicomOptions()
    ds = read_dataset(data)
    problem = decodable_problem(ds)
    if problem is not None:
        raise DicomError(problem[1])
    if not any(keyword in ds for keyword in _PIXEL_DATA):
        raise DicomError("no pixel data")
    arr, photometric, bits_stored = _decode(ds, frame_index(ds, options))
    if photometric in _GREY:
        values = _grey(arr, ds, options)
        if photometric == "MONOCHROME1":
            values = 255.0 - values
    elif photometric in _COLOUR:
        values = _colour(arr, ds, photometric, bits_stored)
    else:
        raise DicomError(f"decoded pixels are {photometric}, which is not supported")
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


def dicom_image(data: bytes, options: DicomOptions | None = None):
    """``read_pixels`` as a PIL image: mode L for grey, RGB for colour."""
    from PIL import Image

    return Image.fromarray(read_pixels(data, options))


def _decode(ds, index: int) -> tuple[np.ndarray, str, int]:
    """One frame as stored (after decompression), with the photometric interpretation it is in."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    try:
        arr, properties = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(
            ds, index=index, validate=True, raw=True, **as_pixel_options(ds))
    except (ValueError, RuntimeError, KeyError, AttributeError, TypeError, EOFError,
            NotImplementedError) as exc:
        raise DicomError(f"cannot decode the pixel data: {exc}") from exc
    return (arr, str(properties.get("photometric_interpretation", ds.PhotometricInterpretation)),
            int(properties.get("bits_stored", ds.get("BitsStored", 8))))


def _grey(arr: np.ndarray, ds, options: DicomOptions) -> np.ndarray:
    """Modality LUT then VOI, as float64 on 0..255 (255 brightest for MONOCHROME2)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_windowing

    if arr.ndim != 2:
        raise DicomError(f"a grey frame should have 2 dimensions, this one has shape {arr.shape}")
    values = apply_modality_lut(arr, ds)
    voi = voi_choice(ds, options)
    if voi.kind == "voi-lut":
        table, first = _voi_table(ds)
        # The LUT takes the modality LUT's output as integer indices; those below its first
        # mapped value get its first entry and those past its end its last (PS3.3 C.11.2.1.1).
        shown = table[np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)]
        return _stretch(shown.astype(np.float64), float(table.min()), float(table.max()))
    if voi.kind == "window":
        # pydicom's windowing on a dataset holding just the window and an 8-bit unsigned
        # output range: the result is already on 0..255, whatever the file's bit depth.
        window = Dataset()
        window.PhotometricInterpretation = "MONOCHROME2"
        window.BitsStored, window.PixelRepresentation = 8, 0
        window.WindowCenter, window.WindowWidth = voi.centre, voi.width
        window.VOILUTFunction = voi.function
        try:
            return apply_windowing(values, window)
        except ValueError as exc:
            raise DicomError(f"cannot apply window {voi.describe()}: {exc}") from exc
    values = values.astype(np.float64)
    return _stretch(values, float(values.min()), float(values.max()))


def _voi_table(ds) -> tuple[np.ndarray, int]:
    """The first VOI LUT's entries and the value its first entry maps.

    Read here rather than looked up through pydicom's ``apply_voi``: pydicom
    3.0.2 holds the indices in the entries' own dtype, so an 8-bit LUT of more
    than 256 entries (a common 4096-entry one) wraps them (index 256 reads entry 0).
    """
    item = ds.VOILUTSequence[0]
    count, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
        order = "<" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">"
        table = np.frombuffer(data[: len(data) // 2 * 2], dtype=f"{order}u2")[:count]
    else:  # US: a list, or one number for a one-entry table
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if len(table) != count:
        raise DicomError(f"the VOI LUT holds {len(table)} entries; its descriptor says {count}")
    return table.astype(np.int64), first


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """low..high -> 0..255 (all 0 when low == high)."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.float64)
    return (values - low) * (255.0 / (high - low))


def _colour(arr: np.ndarray, ds, photometric: str, bits_stored: int) -> np.ndarray:
    """An RGB frame as float64 on 0..255."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return rgb.astype(np.float64) * (255.0 / (255 if rgb.dtype == np.uint8 else 65535))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DicomError(f"a {photometric} frame should have 3 samples per pixel, this one has shape {arr.shape}")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        arr = convert_color_space(arr, photometric, "RGB")
    return arr.astype(np.float64) * (255.0 / (2**bits_stored - 1))
