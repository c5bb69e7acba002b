"""torchvision's ResNet-50 (IMAGENET1K_V2 weights), pooled features before fc, registered as ``resnet50``."""

from __future__ import annotations

from pathlib import Path

from .spec import Built, EncoderSpec, register_encoder
from .weights import load_strict, read_state_dict, torch_hub_download, torch_hub_located

_RESNET50_URL = "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"  # ResNet50_Weights.IMAGENET1K_V2


def _build_resnet50(path: Path | None) -> Built:
    import torchvision
    from torch import nn

    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()  # 2048-d pooled features
    if path is not None:
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
        load_strict(model, state, path, "torchvision resnet50")
    return Built(model)


register_encoder(
    EncoderSpec(
        name="resnet50",
        dim=2048,
        input_size=224,
        preset="imagenet",
        description="ResNet-50, torchvision IMAGENET1K_V2 weights, pooled features before fc",
        weights_from=_RESNET50_URL,
        build=_build_resnet50,
        locate=lambda: torch_hub_located("resnet50", _RESNET50_URL),
        download=lambda: torch_hub_download(_RESNET50_URL),
        offline_hint=f"the file is {_RESNET50_URL}, copy it into the torch hub cache or $MEDIRET_WEIGHTS_DIR",
    )
)
