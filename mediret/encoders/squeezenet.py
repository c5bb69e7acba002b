"""SqueezeNet 1.1 features + global average pool (torchvision or Keras/Caffe weights), registered as ``squeezenet1_1``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec import Built, EncoderSpec, register_encoder
from .weights import load_strict, read_state_dict, sha256, torch_hub_download, torch_hub_located

_SQUEEZENET_URL = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"  # IMAGENET1K_V1
_SQUEEZENET_CAFFE_FILE = "squeezenet1_1_imagenet_features.pth"
# The Keras (rcmalli/keras-squeezenet) weights converted to torchvision names: BGR, 0..255 minus mean.
_SQUEEZENET_CAFFE_SHA256 = "6233d4123a228beb79d75d82927ef422279aef4143250737e60a14a25294c41a"


def _squeezenet_preset(path: Path, state: dict[str, Any] | None = None) -> str | None:
    """``caffe-bgr`` for Keras/Caffe-convention weights: the known file, or any features-only checkpoint.

    torchvision's own checkpoints always include the classifier; the only features-only
    SqueezeNet 1.1 weights around are conversions of the Keras ``notop`` file.
    """
    if sha256(path) == _SQUEEZENET_CAFFE_SHA256:
        return "caffe-bgr"
    keys = (state if state is not None else read_state_dict(path)).keys()
    return "caffe-bgr" if keys and not any(k.startswith("classifier.") for k in keys) else None


def _build_squeezenet(path: Path | None) -> Built:
    import torchvision
    from torch import nn

    features = torchvision.models.squeezenet1_1(weights=None).features
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # 512-d
    if path is None:
        return Built(model)
    state = read_state_dict(path)
    features_state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    load_strict(features, features_state, path, "torchvision squeezenet1_1")
    preset = _squeezenet_preset(path, state)
    if preset is not None:
        return Built(model, preset=preset, note=f"Keras/Caffe-convention weights: preset {preset}")
    return Built(model)


register_encoder(
    EncoderSpec(
        name="squeezenet1_1",
        dim=512,
        input_size=224,
        preset="imagenet",
        description="SqueezeNet 1.1 features + global average pool (torchvision, or Keras/Caffe weights)",
        weights_from=_SQUEEZENET_URL,
        build=_build_squeezenet,
        locate=lambda: torch_hub_located("squeezenet1_1", _SQUEEZENET_URL, (_SQUEEZENET_CAFFE_FILE,)),
        download=lambda: torch_hub_download(_SQUEEZENET_URL),
        offline_hint=(
            f"the file is {_SQUEEZENET_URL}; a Keras/Caffe-convention "
            f"{_SQUEEZENET_CAFFE_FILE} works too (preset caffe-bgr)"
        ),
        preset_for_file=_squeezenet_preset,
    )
)
