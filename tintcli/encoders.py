"""Image encoders: timm models, built from the ``encoder`` config group."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tintcli.errors import TintError


def build_encoder(encoder_cfg: DictConfig) -> nn.Module:
    """A timm model that maps images to features: no classifier (``num_classes: 0``, the
    default), or, for CLIP, the image projection as its head (``num_classes: 512``)."""
    import timm

    kwargs = OmegaConf.to_container(encoder_cfg.timm_kwargs, resolve=True) \
        if encoder_cfg.get("timm_kwargs") else {}
    num_classes = int(encoder_cfg.get("num_classes", 0) or 0)
    try:
        model = timm.create_model(encoder_cfg.timm_model, pretrained=False,
                                  num_classes=num_classes, **kwargs)
        if encoder_cfg.get("head_bias", True) is False:  # CLIP's projection has no bias
            model.head.register_parameter("bias", None)
        return model
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        raise TintError(f"cannot build encoder '{encoder_cfg.name}' with timm model "
                        f"'{encoder_cfg.timm_model}': {reason}\nCheck encoder.timm_kwargs "
                        f"({kwargs}).") from err


def meta_encoder(encoder_cfg: DictConfig) -> nn.Module:
    """The encoder with shapes only: no memory, no weights."""
    with torch.device("meta"):
        return build_encoder(encoder_cfg)


def feature_dim(encoder_cfg: DictConfig) -> int:
    """The width of what the encoder outputs, what a head reads: CLIP's image projection
    (``num_classes``), else timm's features."""
    return int(encoder_cfg.get("num_classes") or meta_encoder(encoder_cfg).num_features)


def resolve_device(name: object) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU (``tintcli.checks.device_named``)."""
    from tintcli.checks import device_named

    try:
        return device_named(name)
    except ValueError as err:
        raise TintError(f"device={name} {err}") from err
