"""``load_encoder``: a registered encoder's weights resolved, its model built and optimized, as an ``Encoder``."""

from __future__ import annotations

from pathlib import Path

from ..errors import EncoderError
from ..preprocess import get_preset
from ._allocator import keep_freed_memory
from .runtime import Encoder, forward_streams_setting, native_bf16
from .spec import get_encoder_spec
from .weights import resolve_weights

PRECISIONS = ("auto", "fp32")


def load_encoder(
    name: str,
    weights: str | Path | None = None,
    preprocess: str | None = None,
    device: str = "cpu",
    optimize: bool = True,
    precision: str = "auto",
    tune_allocator: bool = False,
) -> Encoder:
    """Build encoder ``name`` ready for inference.

    weights: None for the default source (``$MEDIRET_WEIGHTS_DIR``, cache or package,
        then download); a checkpoint path (state dict, possibly wrapped in
        ``{"state_dict": ...}``, or an open_clip checkpoint for CLIP); or ``"random"``
        for an untrained model (tests and benchmarks only).
    preprocess: preset name overriding the one the encoder and its weights call for.
    optimize: False gives the plain eager model, the reference the fast path is checked against.
    precision: ``auto`` tries a bfloat16 copy of the optimized model on CPUs with native
        bf16 and keeps it if it matches fp32 on the first batch (see ``Encoder``);
        ``fp32`` never does.
    tune_allocator: with ``optimize``, apply the process-wide allocator tuning (see
        ``mediret.encoders.tune_allocator``) before the model is built, so that freed
        activation buffers stay mapped and the forward threads of ``Encoder.embed_stream``
        can run; for an encoder that embeds in bulk (``mediret ingest``). Without it the
        encoder leaves the allocator alone and ``embed_stream`` runs one batch at a time.
    """
    import torch

    spec = get_encoder_spec(name)
    if precision not in PRECISIONS:
        raise EncoderError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if preprocess is not None:
        get_preset(preprocess, spec.input_size)  # fail on a bad name before building anything
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise EncoderError(f"invalid device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    path, source = resolve_weights(spec, weights)
    if optimize and tune_allocator:
        keep_freed_memory()  # before the build's torch threads allocate (see mediret.encoders._allocator)
    built = spec.build(path)
    if built.note:
        source = f"{source} ({built.note})"
    preset = preprocess or built.preset or spec.preset

    model = built.model.eval()
    channels_last = False
    if optimize:
        from ._fastpath import optimize as fast_path

        model = fast_path(model, spec.name, spec.input_size, fuse=torch_device.type == "cpu")
        channels_last = spec.channels_last
    model = model.to(torch_device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bf16_model = None
    if optimize and precision == "auto" and torch_device.type == "cpu" and native_bf16():
        from ._fastpath import to_bfloat16

        bf16_model = to_bfloat16(model, spec.input_size)
    streams = forward_streams_setting() if optimize and torch_device.type == "cpu" else 1
    return Encoder(spec, model, get_preset(preset, spec.input_size), source, str(torch_device), optimize,
                   channels_last, bf16_model, forward_streams=streams)
