"""The one way a new image becomes a query vector: image file, DICOM, ``file.npz#split/i``,
uploaded bytes or a stored id -> an embedding made as the store's own vectors were.

``QueryEncoder`` loads the store's encoder once, with the store's preprocessing
and the weights its vectors came from (a recorded local weights file is used
again; random weights cannot be reproduced, so such a store is queried by id).
``search``, ``predict`` and the web server all go through it, so a file is read
(DICOM windowing included) and embedded the same way everywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import SearchError, StoreError
from .store import Store, StoredImage

if TYPE_CHECKING:
    from PIL import Image

RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class Query:
    """What a search looks for.

    source: the query image (a file, an upload's name, or a stored image's source).
    image: the stored image the query is (by id, or a file whose bytes are
        stored), else None.
    group_of: the stored image whose group ``exclude_group`` leaves out
        (its patient/lesion, or the image alone when it has no group);
        None when unknown.
    """

    vector: np.ndarray
    source: str
    image: StoredImage | None = None
    group_of: StoredImage | None = None
    by_id: bool = False

    @property
    def group_id(self) -> str | None:
        return self.group_of.group_id if self.group_of is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "by_id": self.by_id,
                "image_id": self.image.image_id if self.image else None,
                "labels": list(self.image.labels) if self.image else None,
                "group_id": self.group_id}


class QueryEncoder:
    """The store's encoder for query images, loaded on first use and kept.

    weights: the weights file to load when the store's vectors did not come from the
        encoder's default source; by default the store's recorded local weights file, if
        it was built from one.
    encoder: an already loaded encoder to use (it must be the store's encoder and preprocessing).
    warnings: things a person should check, e.g. that weights loaded from another file than
        the store's vectors came from are the same weights.
    """

    def __init__(self, store: Store, weights: str | None = None, device: str = "cpu", encoder=None):
        self.info = store.encoder
        self.dicom = store.dicom_options()  # query files are read as ingest read the store's
        self.store_path = store.path
        self.weights = weights
        self.device = device
        self.warnings: list[str] = []
        self._encoder = None
        if encoder is not None:
            self._check(encoder)
            self._encoder = encoder

    @property
    def encoder(self):
        if self._encoder is None:
            from .encoders import load_encoder

            # fp32: for a few query images, trying bf16 would cost more than it saves
            encoder = load_encoder(self.info.name, weights=self.weights or self._recorded_weights(),
                                   preprocess=self.info.preprocess, device=self.device, precision="fp32")
            self._check(encoder)
            if encoder.weights_source != self.info.weights_source:
                self.warnings.append(
                    f"the store's vectors come from '{self.info.weights_source}', the query was "
                    f"embedded with '{encoder.weights_source}': check they are the same weights")
            self._encoder = encoder
        return self._encoder

    def _check(self, encoder) -> None:
        if (encoder.name, encoder.preprocess.name) != (self.info.name, self.info.preprocess):
            raise SearchError(f"encoder {encoder.name} ({encoder.preprocess.name}) is not the "
                              f"store's {self.info.name} ({self.info.preprocess})")

    def _recorded_weights(self) -> str | None:
        """The weights file the store was built from when it was a local file (else the default)."""
        source = self.info.weights_source or ""
        if source.startswith(RANDOM_WEIGHTS):
            raise SearchError(f"{self.store_path} was built with randomly initialised weights, which a "
                              "new load does not reproduce; query it with --id")
        if not source.startswith("local file "):
            return None
        path = source.removeprefix("local file ")
        if not Path(path).is_file():
            path = path.rsplit(" (", 1)[0]  # load_encoder may append a note in parentheses
        if not Path(path).is_file():
            raise SearchError(f"{self.store_path} was built with the weights file {path}, which is gone; "
                              "pass the same weights with --weights")
        return path

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> (N, dim) float32 unit rows, preprocessed and embedded as ingest does."""
        encoder = self.encoder
        if not images:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        pixels = [encoder.preprocess.pixels(image) for image in images]
        batches = (pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size))
        vectors = np.concatenate([encoder.embed_pixels(batch) for batch in batches]).astype(np.float32)
        if vectors.shape[1] != self.info.dim:
            raise SearchError(f"encoder {self.info.name} gave {vectors.shape[1]}-d vectors but the "
                              f"store holds dim {self.info.dim}; were other --weights used?")
        return vectors

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> (dim,) float32 unit vector."""
        return self.embed_images([image])[0]


def read_image(source: str, dicom=None) -> Image.Image:
    """The image behind a query ``source`` (file, DICOM, ``file.npz#split/index``), decoded;
    SearchError naming the source when it is missing, a folder or unreadable.

    dicom: how DICOM is read (window, frame: ``QueryEncoder.dicom``, the store's own).
    """
    from .sources import open_source

    query_file(source)
    try:
        image = open_source(source, dicom)
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise SearchError(f"cannot read the query image {source}: {exc}") from exc
    return image


def read_bytes(data: bytes, name: str, dicom=None) -> Image.Image:
    """An uploaded image's bytes (any format PIL reads, or DICOM, read with ``dicom``'s options)
    decoded; SearchError when not an image."""
    from PIL import Image, UnidentifiedImageError

    from .sources import decode_image

    try:
        image = decode_image(data, name, dicom) if name.lower().endswith(".dcm") or _is_dicom(data) \
            else Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise SearchError(f"{name} is not an image (no format PIL or pydicom reads)") from None
    except Image.DecompressionBombError as exc:
        raise SearchError(f"{name} is too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SearchError(f"cannot read {name}: corrupt or truncated image ({exc})") from None
    return image


def _is_dicom(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def query_file(source: str) -> tuple[Path, str | None]:
    """The file of a query ``source`` (a path, or ``file.npz#split/index``) and its split, if any;
    SearchError when it is missing or a folder."""
    from .sources import split_source

    path, split, _ = split_source(source)
    if path.is_dir():
        raise SearchError(f"query {path} is a folder; give one image file (or --id for a stored image)")
    if not path.is_file():
        raise SearchError(f"query image {path} not found")
    return path, split


def query_from_id(store: Store, image_id: str) -> Query:
    """A stored image as the query, with its stored vector."""
    try:
        id_ = store.id_of(image_id)
    except StoreError as exc:
        raise SearchError(f"{exc}; --id takes an image_id, as the id column of "
                          "`mediret search` lists them") from exc
    image = store.records([id_])[0]
    return Query(vector=store.vectors([id_])[0], source=image.source, image=image,
                 group_of=image, by_id=True)


def query_from_file(store: Store, source: str, weights: str | None = None,
                    group_of: str | None = None, device: str = "cpu", encoder=None) -> Query:
    """An image file (or DICOM, or ``file.npz#split/index``) embedded with the store's encoder.

    group_of: image_id of a stored image whose group ``exclude_group`` leaves
        out; by default the group of the stored image with the same bytes, if any.
    encoder: a ``QueryEncoder`` of this store to reuse across queries, or an already
        loaded ``Encoder`` (the store's own); by default one is loaded with ``weights``.
    """
    from .ingest import content_hash

    embedder = encoder if isinstance(encoder, QueryEncoder) else QueryEncoder(store, weights, device, encoder)
    path, split = query_file(source)
    vector = embedder.embed_image(read_image(source, embedder.dicom))
    if split is None:
        stored = store.find_by_hash(content_hash(path.read_bytes()))
    else:
        stored = store.find_by_source(source, f"{path.resolve()}#{source.partition('#')[2]}")
    return Query(vector=vector, source=source, image=stored, group_of=_group_image(store, stored, group_of))


def query_from_bytes(store: Store, data: bytes, name: str, encoder: QueryEncoder,
                     group_of: str | None = None) -> Query:
    """An uploaded image (its bytes and file name) embedded with the store's encoder."""
    from .ingest import content_hash

    vector = encoder.embed_image(read_bytes(data, name, encoder.dicom))
    stored = store.find_by_hash(content_hash(data))
    return Query(vector=vector, source=name, image=stored, group_of=_group_image(store, stored, group_of))


def _group_image(store: Store, stored: StoredImage | None, group_of: str | None) -> StoredImage | None:
    if group_of is None:
        return stored
    try:
        return store.records([store.id_of(group_of)])[0]
    except StoreError as exc:
        raise SearchError(f"--group-of: {exc}") from exc
