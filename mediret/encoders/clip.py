"""The CLIP ViT-B/32 image tower (open_clip, OpenAI weights from the Hugging Face hub), registered as ``clip-vit-b-32``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import EncoderError
from .spec import Built, EncoderSpec, Located, register_encoder
from .weights import check_reachable, first_file, hf_hub_cache, weights_dir_candidates

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
    env_paths, env_where = weights_dir_candidates("clip-vit-b-32", _CLIP_FILES)
    snapshots = hf_hub_cache() / f"models--{_CLIP_HF_REPO.replace('/', '--')}" / "snapshots"
    cached = [(p, "Hugging Face cache") for name in _CLIP_FILES for p in sorted(snapshots.glob(f"*/{name}"))]
    return first_file([*env_paths, *cached], (env_where, f"Hugging Face cache {snapshots.parent}"))


def _download_clip() -> Path:
    check_reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(_CLIP_HF_REPO, _CLIP_FILES[0], cache_dir=hf_hub_cache()))
    except EntryNotFoundError:
        return Path(hf_hub_download(_CLIP_HF_REPO, _CLIP_FILES[1], cache_dir=hf_hub_cache()))


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
