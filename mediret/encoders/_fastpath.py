"""The encoders' fast path: rewrites of a model that keep its outputs and save passes over memory.

- **BatchNorm folding**: each BatchNorm right after a convolution is folded into
  that convolution's weights and bias (one pass over every activation map saved;
  EfficientNet-Lite0 has 49 BNs).
- **Convolution + activation fusion** (CPU): a convolution and the ReLU or ReLU6
  after it run as one oneDNN call, the activation applied as the convolution
  writes its output (a oneDNN post-op, the call inductor's CPU fusion makes), and
  a TensorFlow-"same" convolution (timm's ``Conv2dSame``) pads inside the kernel
  instead of copying a padded input. EfficientNet-Lite0 spends about a quarter of
  its eager forward on exactly these two passes (its profile: ``F.pad`` 11 %,
  the in-place ReLU6 12 %).
- **Residual blocks** (CPU, torchvision's ResNet): the stem's convolution and
  every convolution of a block run with their ReLU fused, and a block's last
  convolution adds the shortcut and applies the ReLU after it as post-ops of
  the same call (ResNet50's add and ReLU passes: about 6 % of its folded
  forward).

"Same" padding of a stride-2 convolution over an even-sized input is asymmetric
(TensorFlow pads one more at the end, e.g. 0 before and 1 after for a 3x3 kernel),
which a convolution's own padding argument cannot express. The kernel grown by
one zero row and column at its start, with the larger (after) padding on both
sides, computes exactly the same sums: the extra tap multiplies the extra
leading pad by zero.

``optimize`` keeps each rewrite only if the model's outputs on a probe batch stay
equal (cosine >= ``SAME_OUTPUT_COSINE``), so a model whose module registration
order differs from its execution order keeps its plain form. ``MEDIRET_FUSION=0``
turns the fusion off (BatchNorm folding stays).
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SAME_OUTPUT_COSINE = 0.99999
FUSION_ENV = "MEDIRET_FUSION"  # "0": no convolution + activation fusion


def optimize(model: Any, name: str, input_size: int, fuse: bool) -> Any:
    """``model`` (eval mode) with BatchNorm folded and, if ``fuse``, convolutions fused with activations.

    Returns ``model`` itself when nothing applies; rewrites work on copies. ``fuse``
    only on CPU with oneDNN (the fused call has no CUDA kernel); ``$MEDIRET_FUSION=0``
    overrides it.
    """
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    outputs: list[torch.Tensor] = []  # the original model's, computed once a rewrite needs them

    def keep_if_equal(candidate: Any, what: str) -> bool:
        if not outputs:
            with torch.inference_mode():
                outputs.append(model(probe).float())
        reference = outputs[0]
        try:
            with torch.inference_mode():
                output = candidate(probe).float()
        except RuntimeError as exc:  # e.g. a oneDNN build without the fused operator
            log.warning("%s: %s failed on a probe batch (%s); not used", name, what, exc)
            return False
        cosine = torch.nn.functional.cosine_similarity(reference, output, dim=1).min().item()
        if not cosine >= SAME_OUTPUT_COSINE:
            log.warning("%s: %s changed the outputs (cosine %.6f); not used", name, what, cosine)
            return False
        return True

    result = model
    if any(True for _ in _conv_bn_pairs(result)):
        folded = copy.deepcopy(result)
        _fold_batchnorm(folded)
        if keep_if_equal(folded, "BatchNorm folding"):
            result = folded
    fuse = fuse and os.environ.get(FUSION_ENV, "1") != "0" and torch.backends.mkldnn.is_available()
    if fuse and any(True for _ in itertools.chain(_fusable_pairs(result), _resnet_parts(result))):
        fused = copy.deepcopy(result)
        fuse_resnet(fused)  # first: it rewrites blocks whose convolutions the general pass cannot see through
        fuse_conv_activations(fused)
        if keep_if_equal(fused, "convolution + activation fusion"):
            result = fused
    return result


def to_bfloat16(model: Any, input_size: int) -> Any:
    """A bfloat16 copy of ``model``; fused convolutions fall back to two calls where oneDNN refuses bf16.

    oneDNN's fused bf16 convolution needs AVX512 BW/VL/DQ or AVX-NE-CONVERT as torch
    detects them, which some CPUs with AVX512_BF16 (in some VMs) fail.
    """
    candidate = copy.deepcopy(model).to(torch.bfloat16)
    fused = [m for m in candidate.modules() if isinstance(m, FusedConv2d)]
    if fused:
        probe = torch.zeros(1, 3, input_size, input_size, dtype=torch.bfloat16)
        try:
            with torch.inference_mode():
                candidate(probe)
        except RuntimeError as exc:
            log.info("oneDNN refuses fused bf16 convolutions here (%s); running them as two calls", exc)
            for module in fused:
                module.onednn = False
    return candidate


# ---- BatchNorm folding ---------------------------------------------------------------------------


def _batchnorm_act_class() -> type | None:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is optional for torchvision-only models
        return None
    return BatchNormAct2d


def _adjacent_modules(model: Any) -> Iterator[tuple[Any, str, str]]:
    """(parent, name, next name) for each two child modules registered one after the other."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            yield parent, first, second


def _conv_bn_pairs(model: Any) -> Iterator[tuple[Any, str, str]]:
    """(parent, conv name, norm name) for each BatchNorm2d with running stats registered right after a Conv2d."""
    norms = tuple(t for t in (nn.BatchNorm2d, _batchnorm_act_class()) if t is not None)
    for parent, first, second in _adjacent_modules(model):
        conv, norm = parent._modules[first], parent._modules[second]
        if isinstance(conv, nn.Conv2d) and type(norm) in norms and norm.running_mean is not None:
            yield parent, first, second


def _fold_batchnorm(model: Any) -> int:
    """Fold each BatchNorm of ``_conv_bn_pairs`` into its convolution (in place); returns the count.

    timm's BatchNormAct2d (BN + activation) is replaced by ``Sequential(drop, act)``.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    batchnorm_act = _batchnorm_act_class()
    count = 0
    for parent, first, second in list(_conv_bn_pairs(model)):
        conv, norm = parent._modules[first], parent._modules[second]
        parent._modules[first] = fuse_conv_bn_eval(conv, norm)  # copies conv, keeps its class
        if batchnorm_act is not None and isinstance(norm, batchnorm_act):
            parent._modules[second] = nn.Sequential(norm.drop, norm.act)
        else:
            parent._modules[second] = nn.Identity()
        count += 1
    return count


# ---- convolution + activation fusion -------------------------------------------------------------


def _same_padding_class() -> type | None:
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return None
    return Conv2dSame


def _activation_after(module: Any) -> tuple[bool, str, list[float]]:
    """Whether ``module`` is an activation oneDNN can apply as a post-op, and that post-op.

    Accepts ReLU, ReLU6 / Hardtanh, and a folded BatchNormAct2d (``Sequential`` of
    identities and dropouts ending in one of those). Plain identities count as
    "none" (a ``Conv2dSame`` is still worth rewriting for its padding).
    """
    if isinstance(module, nn.Sequential) and len(module):
        if not all(isinstance(m, (nn.Identity, nn.Dropout)) for m in list(module)[:-1]):
            return False, "", []
        module = module[-1]
    if isinstance(module, nn.ReLU):
        return True, "relu", []
    if isinstance(module, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return True, "hardtanh", [float(module.min_val), float(module.max_val)]
    if isinstance(module, nn.Identity):
        return True, "none", []
    return False, "", []


def _tf_same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one spatial dimension, as timm's ``pad_same``."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def fuse_conv_activations(model: Any) -> int:
    """Replace each Conv2d (or timm Conv2dSame) and the activation registered right after it with
    one ``FusedConv2d`` (in place); returns the count.

    Only convolutions followed by an activation, and "same"-padded ones, are
    rewritten. Registration order is taken for execution order, as for BatchNorm
    folding; ``optimize`` checks the outputs.
    """
    count = 0
    for parent, first, second, attr, scalars, same in list(_fusable_pairs(model)):
        parent._modules[first] = FusedConv2d(parent._modules[first], attr, scalars, same)
        if attr != "none":
            parent._modules[second] = nn.Identity()
        count += 1
    return count


def _fusable_pairs(model: Any) -> Iterator[tuple[Any, str, str, str, list[float], bool]]:
    """(parent, conv name, next name, post-op, its scalars, "same"-padded) for each rewrite
    ``fuse_conv_activations`` makes."""
    same_class = _same_padding_class()
    for parent, first, second in _adjacent_modules(model):
        conv = parent._modules[first]
        if type(conv) not in (nn.Conv2d, same_class) or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            continue
        fusable, attr, scalars = _activation_after(parent._modules[second])
        same = same_class is not None and isinstance(conv, same_class)
        if fusable and (attr != "none" or same):
            yield parent, first, second, attr, scalars, same


class FusedConv2d(nn.Module):
    """A Conv2d and its activation as one oneDNN call (the activation as a post-op).

    ``attr``/``scalars``: the post-op ("none", "relu", or "hardtanh" with [min, max]).
    ``same``: TensorFlow-"same" padding computed from the input size at each call,
    as timm's ``Conv2dSame``; asymmetric padding runs as the kernel grown by one
    leading zero row and column (see the module docstring), or, with dilation or
    a mismatch between the two dimensions, as an explicit pad.
    ``onednn``: False runs the convolution and the activation as two calls (oneDNN
    refuses the fused bf16 call on some CPUs with native bf16; see ``to_bfloat16``).
    ``forward_add`` adds a tensor to the convolution's output before the activation
    (a residual block's shortcut), in the same call.
    """

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list[float], same: bool) -> None:
        super().__init__()
        weight = conv.weight.detach().clone()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_grown", F.pad(weight, (1, 0, 1, 0)) if same else None)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.kernel_size, self.stride = tuple(conv.kernel_size), list(conv.stride)
        self.padding, self.dilation = list(conv.padding), list(conv.dilation)
        self.groups, self.attr, self.scalars, self.same = conv.groups, attr, scalars, same
        self.onednn = True  # False: the same arithmetic as separate conv2d and activation calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.weight, self.padding
        if self.same:
            pads = [_tf_same_padding(size, k, s, d) for size, k, s, d in
                    zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
            if all(before == after for before, after in pads):
                padding = [before for before, _ in pads]
            elif all(after == before + 1 for before, after in pads) and self.dilation == [1, 1]:
                weight, padding = self.weight_grown, [after for _, after in pads]
            else:
                (top, bottom), (left, right) = pads
                x, padding = F.pad(x, (left, right, top, bottom)), [0, 0]
        if self.onednn:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, padding, self.stride,
                                                           self.dilation, self.groups, self.attr, self.scalars, "")
        return self._activate(F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups))

    def forward_add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """activation(conv(x) + other): oneDNN's binary post-op, then the unary one."""
        if self.same:
            raise ValueError("forward_add takes a convolution with fixed padding")
        if self.onednn:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "add", None, None if self.attr == "none" else self.attr, self.scalars, "")
        return self._activate(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups).add_(other))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        """The post-op, in place, for the two-call path."""
        if self.attr == "relu":
            return y.relu_()
        if self.attr == "hardtanh":
            return F.hardtanh_(y, *self.scalars)
        return y

    def extra_repr(self) -> str:
        out, inp = self.weight.shape[0], self.weight.shape[1] * self.groups
        padding = "same (TensorFlow)" if self.same else tuple(self.padding)
        return (f"{inp}, {out}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}, "
                f"padding={padding}, groups={self.groups}, activation={self.attr}{self.scalars or ''}")


# ---- torchvision ResNet ----------------------------------------------------------------------------


def _resnet_classes() -> tuple[type, ...]:
    """(ResNet, BasicBlock, Bottleneck), or () without torchvision."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:
        return ()
    return ResNet, BasicBlock, Bottleneck


def _plain_conv(module: Any) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _numbered(block: Any, prefix: str) -> list[Any]:
    """A residual block's ``conv1, conv2[, conv3]`` (or ``bn1, ...``), in order."""
    return [getattr(block, f"{prefix}{i}") for i in range(1, 4) if hasattr(block, f"{prefix}{i}")]


def _resnet_parts(model: Any) -> Iterator[tuple[str, Any, str | None]]:
    """("stem", resnet, None) or ("block", parent, name) for each part ``fuse_resnet`` rewrites.

    Only parts whose BatchNorms were folded away (``nn.Identity``), whose convolutions
    are plain ``nn.Conv2d`` and whose ReLU is an ``nn.ReLU``: torchvision's forward
    then computes exactly what the rewrite does.
    """
    classes = _resnet_classes()
    if not classes:
        return
    resnet, basic, bottleneck = classes
    for module in model.modules():
        if (isinstance(module, resnet) and _plain_conv(module.conv1) and isinstance(module.bn1, nn.Identity)
                and isinstance(module.relu, nn.ReLU)):
            yield "stem", module, None
        for name, block in module._modules.items():
            if type(block) not in (basic, bottleneck) or not isinstance(block.relu, nn.ReLU):
                continue
            convs, norms = _numbered(block, "conv"), _numbered(block, "bn")
            if all(map(_plain_conv, convs)) and all(isinstance(n, nn.Identity) for n in norms):
                yield "block", module, name


def fuse_resnet(model: Any) -> int:
    """Rewrite torchvision ResNet parts (in place, after BatchNorm folding); returns the count.

    The stem's convolution gets its ReLU fused (the stem's ``relu`` becomes an
    identity: ``ResNet.forward`` uses it nowhere else); each BasicBlock / Bottleneck
    becomes a ``FusedResidualBlock``.
    """
    count = 0
    for kind, parent, name in list(_resnet_parts(model)):
        if kind == "stem":
            parent.conv1, parent.relu = FusedConv2d(parent.conv1, "relu", [], False), nn.Identity()
        else:
            parent._modules[name] = FusedResidualBlock(parent._modules[name])
        count += 1
    return count


class FusedResidualBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck (BatchNorms folded) as fused oneDNN calls.

    Each convolution but the last runs with its ReLU fused; the last adds the
    shortcut (the input, or ``downsample`` of it) and applies the ReLU in the same
    call (``FusedConv2d.forward_add``): ``relu(conv_n(...) + shortcut)``, what the
    block's own forward computes.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        convs = _numbered(block, "conv")
        self.convs = nn.ModuleList(FusedConv2d(conv, "relu", [], False) for conv in convs[:-1])
        self.last = FusedConv2d(convs[-1], "relu", [], False)
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        for conv in self.convs:
            x = conv(x)
        return self.last.forward_add(x, shortcut)
