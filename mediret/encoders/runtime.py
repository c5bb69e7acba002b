"""A loaded encoder at work: ``Encoder`` embeds batches (bf16 check and adoption, forward streams in threads).

``native_bf16`` tells whether this CPU has the bfloat16 arithmetic the bf16 copy needs.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import EncoderError
from ..preprocess import Preprocess
from ._allocator import heap_keeps_large_buffers

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .spec import EncoderSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

BF16_MIN_COSINE = 0.9995  # the bf16 model must match fp32 this closely on the first batch to be kept
# Batches an optimized CPU encoder runs side by side in embed_stream, each on its share of torch's threads;
# $MEDIRET_FORWARD_STREAMS overrides it (1: one batch at a time, holding one batch's activations).
FORWARD_STREAMS = 2
FORWARD_STREAMS_ENV = "MEDIRET_FORWARD_STREAMS"


class Encoder:
    """A loaded encoder: preprocess images with ``.preprocess``, embed batches with ``embed_batch``.

    weights_source: where the weights came from (a file path, with the package or
        cache it belongs to, or ``random``).
    optimized: whether the fast inference path (BatchNorm folded into convolutions and,
        on CPU, convolutions fused with their activations: see ``mediret.encoders._fastpath``;
        channels-last layout; and, if loaded with ``tune_allocator``, activation buffers kept
        by the allocator: see ``mediret.encoders._allocator``) is in use; ``False`` is the
        plain eager reference.
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
        afresh each batch (``mediret.encoders._allocator.heap_keeps_large_buffers``; so
        without the allocator tuning: see ``load_encoder``'s ``tune_allocator``).
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


def forward_streams_setting() -> int:
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
