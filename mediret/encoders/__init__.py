"""Image encoders: a registry of model families, their weights, and the runtime that embeds with them.

``load_encoder(name)`` resolves the weights, builds the model and returns an
``Encoder`` whose ``embed_batch`` maps a preprocessed NCHW batch to L2-normalised
float32 embeddings. Each ``EncoderSpec`` says what an encoder produces (dimension,
input size, preprocessing preset) and where its weights come from.

Modules, one job each:

- ``spec``: ``EncoderSpec``, ``Built``, ``Located``; the registry and ``encoder_table``.
- ``weights``: weights resolution (a given file, ``$MEDIRET_WEIGHTS_DIR``, caches,
  packages, a download after a reachability probe, or an offline error naming what
  to do), and the checkpoint readers the families share.
- ``runtime``: ``Encoder`` (batches, streams of batches in forward threads, the bf16
  check) and ``native_bf16``.
- ``loading``: ``load_encoder``.
- ``clip``, ``resnet``, ``efficientnet_lite``, ``squeezenet``: one model family each,
  registering its spec(s) when imported.
- ``_fastpath`` (BatchNorm folding, convolution fusion, the bf16 copy) and
  ``_allocator`` (glibc tuning that keeps activation buffers mapped): private.

Adding an encoder is one new module plus one import line: write
``mediret/encoders/<family>.py`` with its ``build(path) -> Built`` and
``locate() -> Located`` (and ``download() -> Path`` if the weights can be
fetched; ``weights`` has helpers for ``$MEDIRET_WEIGHTS_DIR``, the torch hub and
Hugging Face caches and for reading checkpoints), and end it with
``register_encoder(EncoderSpec(...))``; then add ``<family>`` to the import of
the families below.

The allocator tuning (``tune_allocator()``: glibc keeps freed activation buffers
mapped and serves every thread from one arena; it returns whether it applied) is
process-wide, so nothing here applies it unasked: ``load_encoder(...,
tune_allocator=True)`` does, before it builds the model, for an encoder that
embeds in bulk (``mediret ingest``; ``mediret.ingest.ingest`` also calls it before
it opens its store). Code that starts threads of its own before loading such an
encoder calls ``tune_allocator()`` first. ``MEDIRET_MALLOC_TUNING=0`` turns it off.
Importing this package imports neither torch nor PIL.
"""

from __future__ import annotations

from . import clip, efficientnet_lite, resnet, squeezenet  # noqa: F401  (each registers its encoders)
from ._allocator import keep_freed_memory as tune_allocator
from .loading import PRECISIONS, load_encoder
from .runtime import BF16_MIN_COSINE, FORWARD_STREAMS, FORWARD_STREAMS_ENV, Encoder, native_bf16
from .spec import Built, EncoderSpec, Located, encoder_table, get_encoder_spec, list_encoders, register_encoder
from .weights import OFFLINE_ENVS, RANDOM, WEIGHTS_DIR_ENV

__all__ = [
    "BF16_MIN_COSINE",
    "FORWARD_STREAMS",
    "FORWARD_STREAMS_ENV",
    "OFFLINE_ENVS",
    "PRECISIONS",
    "RANDOM",
    "WEIGHTS_DIR_ENV",
    "Built",
    "Encoder",
    "EncoderSpec",
    "Located",
    "encoder_table",
    "get_encoder_spec",
    "list_encoders",
    "load_encoder",
    "native_bf16",
    "register_encoder",
    "tune_allocator",
]
