"""Named preprocessing presets: an image (PIL, file or uint8 array) -> normalised float32 CHW tensor.

Every preset resizes the image's shorter side to ``resize_size`` (aspect ratio kept),
centre-crops an ``input_size`` square and normalises. They differ in interpolation,
in how much border the crop removes, and in the normalisation:

==================  ===========  ===========================  ==================================
preset              resample     resize -> crop               normalisation
==================  ===========  ===========================  ==================================
imagenet            bilinear     short side = size -> size    ImageNet mean/std on 0..1
clip                bicubic      short side = size -> size    OpenAI CLIP mean/std on 0..1
median-mad          bilinear     short side = size -> size    per image and channel:
                                                              (x - median) / (1.4826 * MAD)
caffe-bgr           bilinear     short side = size -> size    BGR, 0..255 minus Caffe mean
efficientnet-lite   bicubic      short side = size/crop_pct   mean/std 0.5 on 0..1 (timm's
                                 -> size                      ``tf_efficientnet_lite*`` config)
==================  ===========  ===========================  ==================================

"Resize to 224" (the paper's wording) is implemented as *shorter side to 224, then
centre crop*: no image is distorted, square images (ODIR, PAD-UFES-20, MedMNIST)
keep everything, non-square ones lose the margins of their long side (HAM10000's
4:3 images: 1/8 of the width on each side). ``efficientnet-lite`` follows timm's
crop_pct (0.875 at 224: resize to 256, crop 224).

Resampling runs in torch's antialiased uint8 kernels (``resampler="torch"``, the
default): the same arithmetic as torchvision's ``Resize(antialias=True)`` on
uint8 tensors, faster than PIL's (BENCHMARKS.md part 2), and within 2 grey
levels of PIL's resize with under 1 % of values differing on real HAM10000
images (EfficientNet-Lite0 embeddings keep cosine >= 0.9999 to the PIL path;
the tests check all three). ``resampler="pil"`` resizes with PIL instead, and
then ``imagenet``, ``clip`` and ``efficientnet-lite`` equal torchvision's,
open_clip's and timm's evaluation transforms on PIL images exactly. The tests
check both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mediret.errors import EncoderError
from mediret.sources import jpeg_frame

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keras "caffe" mode: means of the B, G, R channels on the 0..255 scale.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# timm's crop_pct for tf_efficientnet_lite0..4, keyed by their input size.
EFFICIENTNET_LITE_CROP_PCT = {224: 0.875, 240: 0.882, 260: 0.89, 280: 0.904, 300: 0.92}
# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
RESAMPLERS = ("pil", "torch")
# Reductions of at least 2 x REDUCING_GAP first average integer blocks (PIL's reducing_gap).
REDUCING_GAP = 3


@dataclass(frozen=True)
class Preprocess:
    """One preset at one input size; call it on a PIL image to get a float32 (3, size, size) tensor.

    resize_size: the shorter side after resizing, before the centre crop.
    scale: multiplies the 0..255 pixel values before ``mean``/``std`` apply
        (1/255 for 0..1 presets, 1 for ``caffe-bgr``).
    mean, std: per output channel, in output channel order; ignored when ``robust``.
    robust: per-image, per-channel median/MAD normalisation instead of mean/std.
    resampler: "torch" (antialiased uint8 resize, torchvision's tensor path) or
        "pil" (``Image.resize``, torchvision's PIL path); see the module docstring.
    """

    name: str
    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    robust: bool = False
    resampler: str = "torch"

    def __post_init__(self) -> None:
        if self.resampler not in RESAMPLERS:
            raise EncoderError(f"unknown resampler {self.resampler!r}; valid: {', '.join(RESAMPLERS)}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess a PIL image of any mode (RGBA, L, P, I;16, ...): ``pixels`` then ``normalise_batch``."""
        return self.normalise_batch(self.pixels(image)[None])[0]

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized, centre-cropped RGB image as a uint8 (size, size, 3) array: no normalisation.

        A JPEG opened but not yet decoded is decoded at a reduced scale (1/2, 1/4 or
        1/8, via ``Image.draft``) when it is at least twice ``resize_size``: several
        times faster, and within about one grey level of full decoding + resize.
        Equal to ``finish_pixels([decode_for_pixels(image)])[0]``, the two halves
        ingest runs for many images at a time (decoding threads, then one resize per
        input size) before normalising whole batches.
        """
        return self.finish_pixels([self.decode_for_pixels(image)])[0]

    def decode_for_pixels(self, image: Image.Image) -> np.ndarray:
        """The part of ``pixels`` done one image at a time: a uint8 (H, W, 3) RGB array.

        With the torch resampler: the decoded image (drafted, and integer blocks
        averaged first for a >= 6x reduction, as PIL's reducing_gap=3), for
        ``finish_pixels`` to resize and crop. With the PIL resampler: already
        resized and cropped (PIL resizes one image at a time).
        """
        from PIL import Image

        if image.format == "JPEG":
            image.draft("RGB", (self.resize_size, self.resize_size))  # no-op once decoded
        image = to_rgb(image)
        width, height = image.size
        new_w, new_h = _shorter_side_size(width, height, self.resize_size)
        if self.resampler == "torch":
            factor = (width // new_w // REDUCING_GAP, height // new_h // REDUCING_GAP)
            if max(factor) > 1:
                image = image.reduce((max(factor[0], 1), max(factor[1], 1)))
            return np.array(image, dtype=np.uint8)
        if (new_w, new_h) != (width, height):
            resample = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
            image = image.resize((new_w, new_h), resample, reducing_gap=REDUCING_GAP)
        top, left = _crop_origin(new_h, new_w, self.input_size)
        image = image.crop((left, top, left + self.input_size, top + self.input_size))
        return np.array(image, dtype=np.uint8)

    def decode_bytes_for_pixels(self, data: bytes) -> tuple[tuple[int, int], np.ndarray] | None:
        """``decode_for_pixels`` of an image file's bytes, with the image's (width, height),
        for the common case: an 8-bit, 3-channel JPEG that ``draft`` would not reduce.

        PIL's JPEG decoder decodes it straight from the bytes, without the plugin's
        header parsing in Python: the same pixels, in about half the time for a
        HAM10000 image (BENCHMARKS.md part 2). None for anything else (another format,
        a greyscale, CMYK or 12-bit JPEG, one large enough to draft or to trip PIL's
        decompression-bomb check, one that fails to decode): open that with PIL.
        """
        from PIL import Image

        frame = jpeg_frame(data)
        if frame is None or frame.components != 3 or frame.precision != 8:
            return None
        size = (frame.width, frame.height)
        if (min(size) == 0 or frame.width * frame.height > (Image.MAX_IMAGE_PIXELS or math.inf)
                or min(side // self.resize_size for side in size) >= 2):
            return None
        try:
            image = Image.frombytes("RGB", size, data, "jpeg", "RGB", "")
        except (ValueError, OSError):
            return None  # PIL's general path says what is wrong with it
        return size, self.decode_for_pixels(image)

    def finish_pixels(self, decoded: list[np.ndarray]) -> list[np.ndarray]:
        """``pixels`` of many images from their ``decode_for_pixels`` arrays, in order.

        With the torch resampler, images of the same size are resized in one call:
        each call costs about half a millisecond on top of its pixels, more than the
        resize of a 200x150 image itself, so HAM10000 images resize about 4x cheaper
        together than one by one (BENCHMARKS.md part 2), and bit for bit the same.
        """
        if self.resampler != "torch":
            return list(decoded)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, array in enumerate(decoded):
            by_shape.setdefault(array.shape, []).append(i)
        finished: list[np.ndarray] = [np.empty(0, np.uint8)] * len(decoded)
        for indices in by_shape.values():
            resized = self._resize_crop(np.stack([decoded[i] for i in indices]))
            for i, pixels in zip(indices, resized):
                finished[i] = pixels
        return finished

    def _resize_crop(self, arrays: np.ndarray) -> np.ndarray:
        """N x H x W x C uint8 -> N x size x size x C: torch's antialiased resize, then the centre crop."""
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2)  # channels-last NCHW
        height, width = pixels.shape[-2:]
        new_w, new_h = _shorter_side_size(width, height, self.resize_size)
        if (new_w, new_h) != (width, height):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode=self.interpolation, antialias=True,
                                   align_corners=False)
        top, left = _crop_origin(new_h, new_w, self.input_size)
        cropped = pixels[..., top : top + self.input_size, left : left + self.input_size]
        return np.ascontiguousarray(cropped.permute(0, 2, 3, 1).numpy())

    def normalise_batch(self, pixels: np.ndarray | Sequence[np.ndarray], channels_last: bool = True) -> torch.Tensor:
        """(N, size, size, 3) uint8 ``pixels`` -> normalised float32 (N, 3, size, size) batch.

        ``pixels`` is one array or a sequence of N (size, size, 3) arrays (ingest's
        decoded images, stacked once and converted to float in one call). The
        result is laid out channels-last in memory (a permuted view of the
        input's layout, which the encoders' fast path wants: no transposing
        copy) unless ``channels_last`` is false. Values do not depend on the
        layout, nor on how ``pixels`` came.
        """
        batch = self._normalise(_float_pixels(pixels, flip=self.channel_order == "BGR"))
        return batch if channels_last else batch.contiguous()

    def load(self, path: str | Path) -> torch.Tensor:
        """Open an image file and preprocess it (large JPEGs are draft-decoded, see ``pixels``)."""
        from PIL import Image

        with Image.open(path) as image:
            return self(image)

    def from_array(self, array: np.ndarray) -> torch.Tensor:
        """Preprocess one HxW or HxWxC array (uint8 as is; other dtypes min-max scaled to 0..255)."""
        array = np.asarray(array)
        if array.ndim not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image array, got shape {array.shape}")
        return self.from_arrays(array[None])[0]

    def from_arrays(self, arrays: np.ndarray) -> torch.Tensor:
        """Preprocess a stack of same-sized images, NxHxW or NxHxWxC, into an NCHW batch.

        The fast path for array datasets (MedMNIST's 28x28 greyscale): one batched
        resize, in torch whatever the ``resampler``; equal to preprocessing each
        image on its own with the torch resampler.
        """
        arrays = np.asarray(arrays)
        if arrays.ndim == 3:
            arrays = arrays[..., None]
        if arrays.ndim != 4 or arrays.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"expected NxHxW or NxHxWxC (C in 1..4) image arrays, got shape {arrays.shape}")
        if arrays.dtype != np.uint8:
            arrays = np.stack([_to_uint8(a) for a in arrays])
        channels = arrays.shape[-1]
        # Grey + alpha keeps grey; RGBA keeps RGB (alpha dropped as PIL's convert("RGB") does).
        pixels = self._resize_crop(arrays[..., :1] if channels <= 2 else arrays[..., :3])
        if pixels.shape[-1] == 1:  # grey resized once, then copied into R, G and B
            pixels = np.repeat(pixels, 3, axis=-1)
        return self.normalise_batch(pixels, channels_last=False)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 N x H x W x 3 (0..255, contiguous, in the preset's channel order) -> normalised
        float32 N x 3 x H x W, a channels-last view of ``pixels``, overwritten in place."""
        import torch

        if self.robust:
            return _median_mad(pixels.permute(0, 3, 1, 2))
        n, height, width, _ = pixels.shape
        std = torch.tensor(self.std, dtype=torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32)
        # (x * scale - mean) / std as x * (scale / std) + (-mean / std), over rows of W x 3 values
        # with the per-channel factors tiled along them: broadcasting them per channel over
        # channels-last data runs the innermost loop 3 values wide (2.3x slower for a batch of 32
        # at 224, same values). In place on the float batch the images were converted into: the
        # same values as addcmul from uint8, bit for bit, without a second float buffer.
        rows = pixels.view(n * height, width * 3)
        torch.addcmul((-mean / std).repeat(width), rows, (self.scale / std).repeat(width), out=rows)
        return pixels.permute(0, 3, 1, 2)


def _float_pixels(pixels: np.ndarray | Sequence[np.ndarray], flip: bool) -> torch.Tensor:
    """uint8 N x H x W x 3 pixels (one array, or N arrays of H x W x 3) -> a new float32
    N x H x W x 3 tensor of the same values, the channel axis reversed if ``flip`` (RGB -> BGR)."""
    import torch

    if isinstance(pixels, np.ndarray):  # one array: its rows share its shape and dtype
        images, shape, got = pixels, pixels.shape, f"{pixels.dtype} {pixels.shape}"
        mismatched = pixels.dtype != np.uint8
    else:
        images = [np.asarray(image) for image in pixels]
        shape = (len(images), *images[0].shape) if images else (0,)
        got = f"{len(images)} arrays: " + ", ".join(sorted({f"{i.dtype} {i.shape}" for i in images}))
        mismatched = any(i.shape != shape[1:] or i.dtype != np.uint8 for i in images)
    if len(shape) != 4 or shape[-1] != 3 or mismatched:
        raise ValueError(f"expected N x H x W x 3 uint8 pixels, got {got}")
    # One stacked uint8 copy (4.8 MB for 32 images at 224), then one conversion: two calls
    # instead of one small parallel copy per image, which inside ingest, beside the decoding
    # threads, took a quarter longer (BENCHMARKS.md part 2, 2026-12-03).
    stacked = torch.from_numpy(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else np.stack(images))
    return (stacked.flip(-1) if flip else stacked).to(torch.float32)  # always a new tensor: normalised in place


def _preset_imagenet(size: int) -> Preprocess:
    return Preprocess("imagenet", size, size, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


def _preset_clip(size: int) -> Preprocess:
    return Preprocess("clip", size, size, "bicubic", CLIP_MEAN, CLIP_STD)


def _preset_median_mad(size: int) -> Preprocess:
    return Preprocess("median-mad", size, size, "bilinear", robust=True)


def _preset_caffe_bgr(size: int) -> Preprocess:
    return Preprocess("caffe-bgr", size, size, "bilinear", CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), 1.0, "BGR")


def _preset_efficientnet_lite(size: int) -> Preprocess:
    crop_pct = EFFICIENTNET_LITE_CROP_PCT.get(size, 0.875)
    # timm: scale_size = floor(img_size / crop_pct)
    return Preprocess("efficientnet-lite", size, math.floor(size / crop_pct), "bicubic", (0.5,) * 3, (0.5,) * 3)


_PRESETS = {
    "caffe-bgr": _preset_caffe_bgr,
    "clip": _preset_clip,
    "efficientnet-lite": _preset_efficientnet_lite,
    "imagenet": _preset_imagenet,
    "median-mad": _preset_median_mad,
}
PRESETS: tuple[str, ...] = tuple(sorted(_PRESETS))


def get_preset(name: str, input_size: int, resampler: str = "torch") -> Preprocess:
    """The preset ``name`` producing ``input_size`` x ``input_size`` tensors, resizing with ``resampler``."""
    try:
        make = _PRESETS[name]
    except KeyError:
        raise EncoderError(f"unknown preprocessing preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
    if input_size < 1:
        raise EncoderError(f"input size must be positive, got {input_size}")
    return replace(make(input_size), resampler=resampler)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is dropped; 16-bit and float images are min-max scaled to 0..255.

    (PIL's own ``convert`` would clip a 16-bit image at 255, saturating nearly every pixel.)
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning; alpha is then dropped
    return image.convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Linearly map an image's own min..max to 0..255 (a constant image becomes 0)."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    if not high > low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.rint(np.nan_to_num((values - low) * (255.0 / (high - low)))).astype(np.uint8)


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side == size; torchvision's Resize(int) rounding."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centred size x size crop; torchvision's CenterCrop rounding."""
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _median_rows(x: torch.Tensor) -> torch.Tensor:
    """numpy-style median of each row (mean of the two middle values for even lengths)."""
    ordered = x.sort(dim=1).values
    n = ordered.shape[1]
    return (ordered[:, (n - 1) // 2] + ordered[:, n // 2]) / 2


def _median_mad(x: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 * MAD) per image and channel.

    When MAD is 0 (over half of a channel's pixels share one value, e.g. a black
    background) the standard deviation is used instead; a constant channel becomes 0.
    """
    import torch

    n, c, h, w = x.shape
    rows = x.reshape(n * c, h * w)
    median = _median_rows(rows)
    centred = rows - median[:, None]
    sigma = MAD_TO_SIGMA * _median_rows(centred.abs())
    sigma = torch.where(sigma > 0, sigma, rows.std(dim=1))
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    return (centred / sigma[:, None]).reshape(n, c, h, w)
