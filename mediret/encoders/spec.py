"""What an encoder is (``EncoderSpec``, ``Built``, ``Located``) and the registry that lists them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EncoderError


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
