"""Preprocessing presets checked against torchvision / timm / open_clip transforms and numpy arithmetic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mediret.errors import EncoderError
from mediret.preprocess import PRESETS, get_preset

torch.set_num_threads(1)  # 2 cores shared: oversubscribed OpenMP threads slow down 10x

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAM_DIR = DATA / "ham10000" / "HAM10000_images_part_1"
PAD_DIR = DATA / "pad-ufes-20" / "images"
ODIR_DIR = DATA / "odir" / "preprocessed_images"
MEDMNIST = DATA / "medmnist" / "pneumoniamnist.npz"


def _first(folder: Path, pattern: str, index: int = 0) -> Path:
    files = sorted(folder.glob(pattern)) if folder.is_dir() else []
    if len(files) <= index:
        pytest.skip(f"real data not available under {folder}")
    return files[index]


@pytest.fixture(scope="module")
def ham_image() -> Image.Image:
    """A real 200x150 (4:3) HAM10000 JPEG."""
    with Image.open(_first(HAM_DIR, "*.jpg")) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def medmnist_images() -> np.ndarray:
    if not MEDMNIST.is_file():
        pytest.skip(f"real data not available: {MEDMNIST}")
    with np.load(MEDMNIST) as data:
        return data["test_images"][:8]


def _assert_matches(ours: torch.Tensor, reference: torch.Tensor, preset, resampler: str) -> None:
    """PIL resampling: equal to the PIL-based reference. torch resampling: within 2 grey levels of it."""
    if resampler == "pil":
        assert torch.allclose(ours, reference, atol=1e-5)
        return
    one_level = 1.0 / 255.0 / min(preset.std)
    difference = (ours - reference).abs()
    assert difference.max() <= 2 * one_level + 1e-5
    assert difference.mean() < 0.02 * one_level
    assert (difference > 1e-5).float().mean() < 0.01  # about 0.5 % of values differ (bicubic)


def _torchvision_reference(image, resize, size, interpolation, mean, std):
    import torchvision.transforms as T

    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(resize, mode), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])(image)


def test_presets_are_sorted_and_unknown_name_lists_them():
    assert list(PRESETS) == sorted(PRESETS)
    assert {"imagenet", "clip", "median-mad", "caffe-bgr", "efficientnet-lite"} <= set(PRESETS)
    with pytest.raises(EncoderError) as info:
        get_preset("imagenett", 224)
    for name in PRESETS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("size", [224, 260])
def test_output_shape_and_dtype(ham_image, name, size):
    out = get_preset(name, size)(ham_image)
    assert out.shape == (3, size, size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def ham_images() -> list[Image.Image]:
    """Four real HAM10000 JPEGs, decoded."""
    images = []
    for index in range(4):
        with Image.open(_first(HAM_DIR, "*.jpg", index)) as image:
            images.append(image.convert("RGB"))
    return images


@pytest.mark.parametrize("name", PRESETS)
def test_batch_normalisation_equals_the_per_image_path(ham_images, name):
    preset = get_preset(name, 224)
    pixels = np.stack([preset.pixels(image) for image in ham_images])
    assert pixels.shape == (4, 224, 224, 3) and pixels.dtype == np.uint8
    # the resize + crop alone, checked against PIL itself: shorter side to 224 or 256, centre crop
    resample = Image.Resampling.BICUBIC if preset.interpolation == "bicubic" else Image.Resampling.BILINEAR
    width = int(ham_images[0].width * preset.resize_size / ham_images[0].height)  # torchvision truncates
    resized = np.asarray(ham_images[0].resize((width, preset.resize_size), resample))
    left, top = round((width - 224) / 2), round((preset.resize_size - 224) / 2)
    expected = resized[top:top + 224, left:left + 224]
    assert np.array_equal(get_preset(name, 224, "pil").pixels(ham_images[0]), expected)
    assert np.abs(pixels[0].astype(int) - expected).max() <= 2  # torch's resampling: within 2 levels
    batch = preset.normalise_batch(pixels)
    one_by_one = torch.stack([preset(image) for image in ham_images])
    assert torch.equal(batch, one_by_one)
    assert torch.equal(preset.normalise_batch(list(pixels)), one_by_one)  # ingest's list of decoded images
    assert torch.equal(preset.normalise_batch(pixels, channels_last=False), one_by_one)
    assert preset.normalise_batch(pixels, channels_last=False).is_contiguous()
    if not preset.robust:  # per-image statistics need a reshape; mean/std presets stay a view of the layout
        assert batch.is_contiguous(memory_format=torch.channels_last)


def test_normalise_batch_rejects_other_input():
    preset = get_preset("imagenet", 224)
    for bad in (np.zeros((2, 224, 224, 3), dtype=np.float32), np.zeros((2, 3, 224, 224), dtype=np.uint8),
                np.zeros((224, 224, 3), dtype=np.uint8), [],
                [np.zeros((224, 224, 3), dtype=np.uint8), np.zeros((224, 200, 3), dtype=np.uint8)],
                [np.zeros((224, 224, 3), dtype=np.uint8), np.zeros((224, 224, 3), dtype=np.int16)]):
        with pytest.raises(ValueError, match="N x H x W x 3 uint8"):
            preset.normalise_batch(bad)


@pytest.mark.parametrize("resampler", ["pil", "torch"])
def test_imagenet_matches_torchvision(ham_image, resampler):
    preset = get_preset("imagenet", 224, resampler)
    ref = _torchvision_reference(ham_image, 224, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    _assert_matches(preset(ham_image), ref, preset, resampler)


@pytest.mark.parametrize("name", ["imagenet", "clip", "efficientnet-lite"])
def test_torch_resampler_equals_torchvision_tensor_transforms(ham_images, name):
    """The default resampler is torchvision's uint8 tensor path: Resize(antialias=True), CenterCrop, Normalize."""
    import torchvision.transforms.v2 as T

    preset = get_preset(name, 224)
    mode = T.InterpolationMode.BICUBIC if preset.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    transform = T.Compose([T.Resize(preset.resize_size, mode, antialias=True), T.CenterCrop(224),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])
    for image in ham_images:
        reference = transform(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        assert torch.allclose(preset(image), reference, atol=1e-5)


@pytest.mark.parametrize("resampler", ["pil", "torch"])
def test_clip_matches_open_clip(ham_image, resampler):
    import open_clip

    transform = open_clip.image_transform(
        224,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
        interpolation="bicubic",
        resize_mode="shortest",
    )
    preset = get_preset("clip", 224, resampler)
    _assert_matches(preset(ham_image), transform(ham_image), preset, resampler)


@pytest.mark.parametrize("resampler", ["pil", "torch"])
@pytest.mark.parametrize("arch, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260)])
def test_efficientnet_lite_matches_timm_pretrained_cfg(ham_image, arch, size, resampler):
    import timm.data
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch).to_dict()
    assert cfg["input_size"] == (3, size, size)
    transform = timm.data.create_transform(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
    preset = get_preset("efficientnet-lite", size, resampler)
    _assert_matches(preset(ham_image), transform(ham_image), preset, resampler)


def _resized_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side -> size (bilinear), centre crop, as HxWx3 float64 0..255."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.resize(new, Image.Resampling.BILINEAR)
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float64)


def test_caffe_bgr_is_bgr_0_255_minus_mean(ham_image):
    rgb = _resized_crop(ham_image, 224)
    expected = rgb[:, :, ::-1] - np.array([103.939, 116.779, 123.68])
    ours = get_preset("caffe-bgr", 224)(ham_image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    # channel 0 is blue: the red-dominant skin image has its largest mean in channel 2
    assert ours[..., 2].mean() + 123.68 > ours[..., 0].mean() + 103.939


def test_median_mad_matches_numpy(ham_image):
    x = _resized_crop(ham_image, 224) / 255.0
    median = np.median(x, axis=(0, 1))
    mad = np.median(np.abs(x - median), axis=(0, 1))
    assert (mad > 0).all()
    expected = (x - median) / (1.4826 * mad)
    ours = get_preset("median-mad", 224)(ham_image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    # robust-normalised channels have median 0 and MAD 1/1.4826
    np.testing.assert_allclose(np.median(ours, axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.median(np.abs(ours), axis=(0, 1)), 1 / 1.4826, atol=1e-4)


def test_median_mad_guards_zero_mad():
    rng = np.random.default_rng(0)
    pixels = np.zeros((224, 224, 3), dtype=np.uint8)  # black background over 70 % of the image
    pixels[:67] = rng.integers(1, 256, size=(67, 224, 3), dtype=np.uint8)
    out = get_preset("median-mad", 224)(Image.fromarray(pixels))
    assert torch.isfinite(out).all()
    # MAD is 0 here, so the standard deviation scales instead: unit std per channel
    np.testing.assert_allclose(out.reshape(3, -1).std(dim=1).numpy(), 1.0, atol=1e-3)
    constant = get_preset("median-mad", 224)(Image.new("RGB", (50, 50), (7, 7, 7)))
    assert torch.count_nonzero(constant) == 0


def test_rgba_png_equals_its_rgb(ham_image):
    path = _first(PAD_DIR, "*.png")
    with Image.open(path) as image:
        image.load()
        assert image.mode in ("RGBA", "RGB")
        preset = get_preset("imagenet", 224)
        assert torch.equal(preset(image), preset(image.convert("RGB")))
        assert torch.equal(preset.load(path), preset(image.convert("RGB")))


def test_grayscale_and_palette_become_three_channels(ham_image):
    preset = get_preset("imagenet", 224)
    gray = preset(ham_image.convert("L"))
    raw = gray * torch.tensor(preset.std).view(3, 1, 1) + torch.tensor(preset.mean).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    palette = preset(ham_image.convert("P"))
    assert palette.shape == (3, 224, 224)


def test_16_bit_image_is_scaled_not_saturated(ham_image):
    values = np.asarray(ham_image.convert("L"), dtype=np.uint16) * 40 + 1000  # 1000..11200, a 16-bit scan
    image16 = Image.fromarray(values)
    assert image16.mode.startswith("I")
    preset = get_preset("imagenet", 224)
    out = preset(image16)
    # PIL's convert("RGB") would clip everything to 255: a constant image
    assert out.std() > 0.5
    # min-max scaling maps the 16-bit range onto 0..255 like the 8-bit original's own range
    eight_bit = np.asarray(ham_image.convert("L"), dtype=np.float64)
    rescaled = (eight_bit - eight_bit.min()) * 255 / (eight_bit.max() - eight_bit.min())
    expected = preset(Image.fromarray(np.rint(rescaled).astype(np.uint8)))
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_medmnist_arrays_match_pil_path(medmnist_images, name):
    preset = get_preset(name, 224)
    batch = preset.from_arrays(medmnist_images)
    assert batch.shape == (len(medmnist_images), 3, 224, 224) and batch.dtype == torch.float32
    one_by_one = torch.stack([preset(Image.fromarray(a)) for a in medmnist_images])
    assert torch.equal(batch, one_by_one)  # both resize in torch: grey once, then copied to R, G, B
    # PIL's resize of the same images: bilinear equal, bicubic within 2 grey levels
    via_pil = torch.stack([get_preset(name, 224, "pil")(Image.fromarray(a)) for a in medmnist_images])
    one_level = 1.0 / 255.0 / min(preset.std) if not preset.robust else 0.5
    assert (batch - via_pil).abs().max() <= 2 * one_level + 1e-5
    assert (batch - via_pil).abs().mean() < 0.05 * one_level
    single = preset.from_array(medmnist_images[0])
    assert torch.equal(single, batch[0])
    assert torch.equal(preset.from_array(np.repeat(medmnist_images[0][..., None], 3, axis=2)), single)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_large_reduction_averages_blocks_first_like_pil(ham_image, interpolation):
    """A 2000x1500 PNG (no JPEG draft) to 224: an integer block average, then the antialiased resize."""
    big = ham_image.resize((2000, 1500), Image.Resampling.BICUBIC)
    preset = get_preset("imagenet" if interpolation == "bilinear" else "clip", 224)
    pil = get_preset(preset.name, 224, "pil")
    assert preset.pixels(big).shape == (224, 224, 3)
    difference = np.abs(preset.pixels(big).astype(int) - pil.pixels(big))
    assert difference.mean() < 0.02 and difference.max() <= 2  # PIL reduces by the same blocks
    # one antialiased resize of the full image, no block average, lands measurably further from PIL
    direct = preset._resize_crop(np.array(big)[None])[0]
    assert np.abs(direct.astype(int) - pil.pixels(big)).mean() > 0.05


def test_unknown_resampler_is_refused():
    with pytest.raises(EncoderError, match="unknown resampler 'cv2'"):
        get_preset("imagenet", 224, "cv2")


def test_from_array_rejects_bad_shapes():
    with pytest.raises(ValueError):
        get_preset("imagenet", 224).from_array(np.zeros((2, 3, 28, 28), dtype=np.uint8))


def test_jpeg_draft_decoding_stays_close(ham_image, tmp_path):
    big = tmp_path / "big.jpg"
    ham_image.resize((1600, 1200), Image.Resampling.BICUBIC).save(big, quality=95)
    preset = get_preset("imagenet", 224)
    with Image.open(big) as image:
        image.load()  # decoded in full: draft no longer applies
        full = preset(image)
    drafted = preset.load(big)
    with Image.open(big) as image:
        assert torch.equal(preset(image), drafted)  # an opened, undecoded JPEG is drafted too
    with Image.open(big) as image:
        image.draft("RGB", (224, 224))
        assert image.size[0] < 1600  # the decoder really scaled down
    assert drafted.shape == full.shape
    assert (drafted - full).abs().mean() < 0.02  # in ImageNet-std units: ~1 grey level
    small = _first(HAM_DIR, "*.jpg")
    with Image.open(small) as image:
        assert torch.equal(preset.load(small), preset(image))


@pytest.mark.parametrize("name", ["efficientnet-lite", "imagenet"])
def test_many_images_of_mixed_sizes_resize_together_as_torchvision_one_by_one(name):
    """Ingest's two halves (decode per image, one resize per size): torchvision's uint8 path, in order."""
    import torchvision.transforms.v2 as T

    paths = [_first(HAM_DIR, "*.jpg", 0), _first(PAD_DIR, "*.png", 0), _first(ODIR_DIR, "*.jpg", 0),
             _first(HAM_DIR, "*.jpg", 1), _first(PAD_DIR, "*.png", 1), _first(HAM_DIR, "*.jpg", 2)]
    images = [Image.open(p).convert("RGB") for p in paths]
    images.insert(3, images[0].transpose(Image.Transpose.ROTATE_90))  # portrait 150x200
    assert len({image.size for image in images}) == 4
    preset = get_preset(name, 224)
    got = preset.finish_pixels([preset.decode_for_pixels(image) for image in images])
    mode = T.InterpolationMode.BICUBIC if preset.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    transform = T.Compose([T.Resize(preset.resize_size, mode, antialias=True), T.CenterCrop(224)])
    for image, pixels in zip(images, got, strict=True):
        expected = transform(torch.from_numpy(np.array(image)).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(pixels, preset.pixels(image))
    pil = get_preset(name, 224, resampler="pil")
    decoded = [pil.decode_for_pixels(image) for image in images]  # PIL resizes one image at a time
    assert all(a is b for a, b in zip(pil.finish_pixels(decoded), decoded))


def _real_jpegs(n_ham: int, n_odir: int) -> list[Path]:
    """A seeded sample of real HAM10000 (200x150) and ODIR (256x256) JPEG files."""
    rng = np.random.default_rng(0)
    paths = []
    for folder, n in ((HAM_DIR, n_ham), (ODIR_DIR, n_odir)):
        files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if len(files) < n:
            pytest.skip(f"real data not available under {folder}")
        paths += [files[i] for i in rng.choice(len(files), n, replace=False)]
    return paths


def _assert_decodes_as_pil_opens(preset, data: bytes, what) -> None:
    """``decode_bytes_for_pixels`` takes the direct path on ``data`` and gives Image.open's size and pixels."""
    decoded = preset.decode_bytes_for_pixels(data)
    assert decoded is not None, what
    with Image.open(io.BytesIO(data)) as image:
        assert decoded[0] == image.size, what
        np.testing.assert_array_equal(decoded[1], preset.decode_for_pixels(image))


@pytest.mark.parametrize(("name", "resampler"), [("efficientnet-lite", "torch"), ("imagenet", "pil")])
def test_jpeg_bytes_decode_as_pil_opens_them(name, resampler):
    """Ingest's decoding straight from a JPEG's bytes: the size and pixels of PIL's Image.open path."""
    preset = get_preset(name, 224, resampler)
    for path in _real_jpegs(60, 40):  # every real JPEG here takes the direct path
        _assert_decodes_as_pil_opens(preset, path.read_bytes(), path)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_jpeg_bytes_decode_leaves_other_images_to_pil(ham_image):
    """Only plain 8-bit, 3-channel JPEGs too small to draft take the direct path; the rest return None."""
    preset = get_preset("efficientnet-lite", 224)  # resizes to 256: drafting starts at 512 x 512
    exif = Image.Exif()
    exif[0x010E] = "dermoscopy"  # ImageDescription: an APP1 segment before the frame header
    taken = {
        "progressive": _jpeg_bytes(ham_image, progressive=True, quality=90),
        "exif and comment": _jpeg_bytes(ham_image, exif=exif.tobytes(), comment=b"lesion"),
        "511 x 600": _jpeg_bytes(ham_image.resize((511, 600))),
    }
    for what, data in taken.items():
        _assert_decodes_as_pil_opens(preset, data, what)
    declined = {
        "greyscale": _jpeg_bytes(ham_image.convert("L")),
        "CMYK": _jpeg_bytes(ham_image.convert("CMYK")),
        "large enough to draft": _jpeg_bytes(ham_image.resize((700, 525))),
        "truncated": _jpeg_bytes(ham_image)[:1500],
        "PNG": _first(PAD_DIR, "*.png").read_bytes(),
        "not an image": b"\xff\xd8 but then text",
    }
    for what, data in declined.items():
        assert preset.decode_bytes_for_pixels(data) is None, what
