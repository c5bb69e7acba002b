"""The encoders' fast path: fused convolutions against timm's and torch's own modules, on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mediret.encoders import _fastpath as fastpath
from mediret.encoders import get_encoder_spec, load_encoder
from mediret.encoders._fastpath import FusedConv2d, FusedResidualBlock

torch.set_num_threads(1)  # 2 cores shared: oversubscribed OpenMP threads slow down 10x

timm_layers = pytest.importorskip("timm.layers")
HAM_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000" / "HAM10000_images_part_1"


def _ham_images(n: int) -> list[Image.Image]:
    files = sorted(HAM_DIR.glob("*.jpg"))[:n] if HAM_DIR.is_dir() else []
    if len(files) < n:
        pytest.skip(f"real data not available under {HAM_DIR}")
    return [Image.open(f).convert("RGB") for f in files]


@pytest.mark.parametrize("kernel,stride,dilation,size", [
    (3, 2, 1, (16, 16)),   # even input: TF pads 0 before, 1 after -> the grown kernel
    (5, 2, 1, (14, 14)),   # 1 before, 2 after -> the grown kernel
    (3, 2, 1, (15, 15)),   # odd input: symmetric 1, 1
    (5, 1, 1, (12, 12)),   # stride 1: symmetric
    (3, 2, 2, (16, 16)),   # dilation: an explicit pad
    (3, 2, 1, (16, 15)),   # the two dimensions differ: an explicit pad
])
@pytest.mark.parametrize("activation", [nn.ReLU6(), nn.ReLU(), None])
@pytest.mark.parametrize("onednn", [True, False])
def test_fused_same_convolution_equals_timm_conv2d_same_then_activation(kernel, stride, dilation, size,
                                                                        activation, onednn):
    torch.manual_seed(0)
    conv = timm_layers.Conv2dSame(6, 6, kernel, stride=stride, dilation=dilation, groups=3, bias=True).eval()
    x = torch.randn(2, 6, *size) * 3
    with torch.inference_mode():
        expected = conv(x)
        if activation is not None:
            expected = activation(expected)
        attr, scalars = {nn.ReLU6: ("hardtanh", [0.0, 6.0]), nn.ReLU: ("relu", []),
                         type(None): ("none", [])}[type(activation)]
        fused = FusedConv2d(conv, attr, scalars, same=True)
        fused.onednn = onednn
        got = fused(x)
        got_channels_last = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_channels_last, expected, atol=1e-5, rtol=1e-5)
    if activation is not None:
        assert (expected == 0).any()  # the activation clipped something: the comparison covers it


def test_tf_same_padding_matches_timm():
    from timm.layers.padding import get_same_padding

    for size in range(5, 40):
        for kernel, stride, dilation in ((3, 2, 1), (5, 2, 1), (3, 1, 1), (3, 2, 2), (7, 4, 1)):
            before, after = fastpath._tf_same_padding(size, kernel, stride, dilation)
            total = get_same_padding(size, kernel, stride, dilation)
            assert (before, after) == (total // 2, total - total // 2)


def test_efficientnet_lite0_fast_path_fuses_and_keeps_embeddings_on_real_images():
    """Real weights, real HAM10000 images: fused vs folded-only vs the eager model."""
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    reference = load_encoder("efficientnet-lite0", optimize=False)
    modules = list(encoder.model.modules())
    fused = [m for m in modules if isinstance(m, FusedConv2d)]
    # the stem and the four stride-2 depthwise convolutions pad "same"; every ReLU6 is fused
    assert sum(m.same for m in fused) == 5
    assert not any(isinstance(m, (nn.ReLU6, timm_layers.Conv2dSame)) for m in modules)
    assert sum(m.attr == "hardtanh" for m in fused) == sum(isinstance(m, nn.ReLU6) for m in reference.model.modules())

    unfused = fastpath.optimize(reference.model, "efficientnet-lite0", 224, fuse=False)
    assert not any(isinstance(m, FusedConv2d) for m in unfused.modules())
    pixels = np.stack([encoder.preprocess.pixels(image) for image in _ham_images(6)])
    batch = encoder.preprocess.normalise_batch(pixels)
    got = encoder.embed_batch(batch)
    with torch.inference_mode():
        folded = torch.nn.functional.normalize(unfused(batch.contiguous()), dim=1).numpy()
    np.testing.assert_allclose(got, folded, atol=2e-6)
    cosine = (got * reference.embed_batch(batch)).sum(axis=1)
    assert cosine.min() >= 0.99999


def test_fusion_is_not_kept_when_the_registration_order_lies(caplog):
    """A module that registers conv then ReLU but applies the ReLU first must keep its own forward."""

    class ReluFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.conv(self.act(x)).mean(dim=(2, 3))

    model = ReluFirst().eval()
    with caplog.at_level(logging.WARNING, logger="mediret.encoders._fastpath"):
        kept = fastpath.optimize(model, "relu-first", 16, fuse=True)
    assert kept is model
    assert "changed the outputs" in caplog.text
    in_order = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    fused = fastpath.optimize(in_order, "in-order", 16, fuse=True)
    assert isinstance(fused[0], FusedConv2d) and isinstance(fused[1], nn.Identity)


def test_bfloat16_copy_runs_and_matches_fp32():
    """Fused or as two calls (where oneDNN refuses fused bf16), the bf16 copy stays close to fp32."""
    spec = get_encoder_spec("efficientnet-lite0")
    encoder = load_encoder("efficientnet-lite0", precision="fp32")
    candidate = fastpath.to_bfloat16(encoder.model, spec.input_size)
    pixels = np.stack([encoder.preprocess.pixels(image) for image in _ham_images(4)])
    batch = encoder.preprocess.normalise_batch(pixels)
    with torch.inference_mode():
        got = torch.nn.functional.normalize(candidate(batch.to(torch.bfloat16)).float(), dim=1).numpy()
    assert all(p.dtype == torch.bfloat16 for p in candidate.buffers() if p.is_floating_point())
    assert (got * encoder.embed_batch(batch)).sum(axis=1).min() >= 0.99  # bf16 rounding, not a wrong layer


def test_fusion_can_be_turned_off(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    monkeypatch.setenv(fastpath.FUSION_ENV, "0")
    assert fastpath.optimize(model, "plain", 16, fuse=True) is model
    monkeypatch.setenv(fastpath.FUSION_ENV, "1")
    assert isinstance(fastpath.optimize(model, "fused", 16, fuse=True)[0], FusedConv2d)


@pytest.mark.parametrize("attr", ["relu", "none"])
@pytest.mark.parametrize("onednn", [True, False])
def test_forward_add_is_activation_of_convolution_plus_other(attr, onednn):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=True).eval()
    x, other = torch.randn(2, 8, 10, 10), torch.randn(2, 8, 10, 10) * 2
    with torch.inference_mode():
        expected = conv(x) + other
        if attr == "relu":
            expected = expected.relu()
        fused = FusedConv2d(conv, attr, [], same=False)
        fused.onednn = onednn
        got = fused.forward_add(x, other.clone())
        got_channels_last = fused.forward_add(x.contiguous(memory_format=torch.channels_last),
                                              other.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_channels_last, expected, atol=1e-5, rtol=1e-5)
    assert ((expected == 0).any() if attr == "relu" else (expected < 0).any())  # the order of add and ReLU shows


def _small_batch(n: int, size: int) -> torch.Tensor:
    """``n`` real images resized to ``size`` and roughly standardised: NCHW float32, channels-last in memory."""
    pixels = np.stack([np.asarray(image.resize((size, size))) for image in _ham_images(n)])
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


def _random_resnet(arch: str) -> nn.Module:
    """torchvision's ``arch`` with seeded random weights, in eval mode, its classifier removed."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    model.fc = nn.Identity()
    return model


@pytest.mark.parametrize("arch, blocks", [("resnet18", 8), ("resnet50", 16)])
@pytest.mark.parametrize("onednn", [True, False])
def test_resnet_blocks_fuse_and_keep_outputs_on_real_images(arch, blocks, onednn):
    """torchvision ResNets (random weights): every block and the stem rewritten, outputs as the folded model's."""
    model = _random_resnet(arch)
    folded = fastpath.optimize(model, arch, 64, fuse=False)
    fused = fastpath.optimize(model, arch, 64, fuse=True)
    assert sum(isinstance(m, FusedResidualBlock) for m in fused.modules()) == blocks
    assert isinstance(fused.conv1, FusedConv2d) and isinstance(fused.relu, nn.Identity)
    in_downsample = {id(m) for block in fused.modules() if isinstance(block, FusedResidualBlock)
                     and block.downsample is not None for m in block.downsample.modules()}
    assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
    assert all(id(m) in in_downsample for m in fused.modules() if isinstance(m, nn.Conv2d))
    for module in fused.modules():
        if isinstance(module, FusedConv2d):
            module.onednn = onednn
    batch = _small_batch(4, 64)
    with torch.inference_mode():
        expected, got = folded(batch), fused(batch.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_copy_of_fused_resnet_matches_fp32():
    """The residual blocks' fused add in bf16 (one oneDNN call where it takes bf16, else two) stays near fp32."""
    model = _random_resnet("resnet18")
    fused = fastpath.optimize(model, "resnet18", 64, fuse=True)
    candidate = fastpath.to_bfloat16(fused, 64)
    assert sum(isinstance(m, FusedResidualBlock) for m in candidate.modules()) == 8
    assert all(p.dtype == torch.bfloat16 for p in candidate.parameters())
    batch = _small_batch(4, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model(batch), dim=1)
        got = torch.nn.functional.normalize(candidate(batch.to(torch.bfloat16)).float(), dim=1)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got * expected).sum(dim=1).min() >= 0.99  # bf16 rounding, not a wrong add or activation
