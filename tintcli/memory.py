"""How much device memory test-time adaptation needs, term by term (``tint bench`` prints it).

Layer-wise adaptation (AdaMerging, Model Tinting) keeps, on the device:

- theta_0's merged entries, float32: P x 4 bytes (P = the encoder's parameters);
- the stacked task vectors: T x P x 4 bytes (float32) or x 2 (``vectors_dtype=bf16``): the
  largest term, and the only one that grows with the number of tasks T;
- one merged copy theta(lambda) and, in the backward, its gradient: 2 x P x 4 bytes;
- the activations saved for the backward of one batch (one task at a time: AdaMerging runs
  each task's forward+backward on its own), measured here exactly by running the encoder on
  the meta device (shapes only, no memory, no weights) and adding up what autograd saves;
  an upper bound: under AMP most of them are half precision, and fused attention on a GPU
  keeps no attention matrix;
- the experts' logits on every adaptation image and Tinting's heads with their Adam state,
  both small; the uint8 adaptation images only where they fit (else they stream from the host).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

GiB = 1024 ** 3


def meta_encoder(encoder_cfg: DictConfig) -> torch.nn.Module:
    """The encoder with shapes only: no memory, no weights."""
    from tintcli.encoders import build_encoder

    with torch.device("meta"):
        return build_encoder(encoder_cfg)


def activation_bytes(encoder_cfg: DictConfig, batch_size: int,
                     encoder: torch.nn.Module | None = None) -> int:
    """Bytes autograd saves for the backward of one forward over ``batch_size`` images
    (float32), counted on the meta device: each saved tensor once."""
    encoder = encoder if encoder is not None else meta_encoder(encoder_cfg)
    size = int(encoder_cfg.get("image_size") or encoder_cfg.timm_kwargs.img_size)
    x = torch.empty(batch_size, 3, size, size, device="meta", requires_grad=True)
    saved: dict[int, torch.Tensor] = {}  # held, so that no id is reused while counting

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):  # weights are counted as weights
            saved[id(tensor)] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(x)
    return sum(t.numel() * t.element_size() for t in saved.values())


@dataclass
class MemoryModel:
    encoder: str
    tasks: int
    batch_size: int
    vectors_dtype: str
    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def adaptation_memory(encoder_cfg: DictConfig, tasks: int, batch_size: int = 32,
                      vectors_dtype: str = "fp32", classes: int = 1000) -> MemoryModel:
    """The device memory of one layer-wise adaptation step (see the module docstring);
    ``classes``: total classes over the tasks (the experts' logits, the tinted heads)."""
    encoder = meta_encoder(encoder_cfg)
    params = sum(p.numel() for p in encoder.parameters())
    width = int(encoder_cfg.get("num_classes") or 512)
    vector_bytes = 2 if vectors_dtype == "bf16" else 4
    terms = {
        "theta_0 (fp32)": params * 4,
        f"task vectors ({tasks} x {vectors_dtype})": tasks * params * vector_bytes,
        "merged theta + its gradient": 2 * params * 4,
        f"activations (batch {batch_size}, fp32)": activation_bytes(encoder_cfg, batch_size,
                                                                    encoder),
        "tinted heads + Adam (3 copies)": 3 * classes * width * 4,
    }
    return MemoryModel(str(encoder_cfg.name), tasks, batch_size, vectors_dtype, terms)
