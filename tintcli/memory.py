"""How much device memory test-time adaptation needs, term by term (``tint bench`` prints it).

The shared pieces (``MemoryModel``, activations counted on the meta device, the pixels, the
check against the device) live here; a method whose memory differs from the layer-wise step's
declares its own model with it (``register(memory=...)``: WEMoE's, Surgery's).

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
  both small;
- the test pixels (uint8, every task's: they are the adaptation images too) where
  ``runtime.resident_pixels`` keeps them on the device: 13 GB for ViT-B/32's eight tasks at
  224 × 224, more than everything else together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from tintcli.encoders import meta_encoder

GiB = 1024 ** 3


_COUNTED: dict[tuple, int] = {}  # activation_bytes by (model, encoder config, batch)


def activation_bytes(encoder_cfg: DictConfig, batch_size: int,
                     encoder: torch.nn.Module | None = None, model: str = "encoder") -> int:
    """Bytes autograd saves for the backward of one forward over ``batch_size`` images
    (float32), counted on the meta device: each saved tensor once. Counted once per
    ``model`` (what ``encoder`` is: the plain encoder, or a method's model built on it),
    encoder config and batch size (the vectors' dtype does not change it)."""
    key = (model, OmegaConf.to_yaml(encoder_cfg), batch_size)
    if key not in _COUNTED:
        _COUNTED[key] = _count_saved(encoder_cfg, batch_size, encoder)
    return _COUNTED[key]


def _count_saved(encoder_cfg: DictConfig, batch_size: int,
                 encoder: torch.nn.Module | None) -> int:
    encoder = encoder if encoder is not None else meta_encoder(encoder_cfg)
    size = int(encoder_cfg.get("image_size") or encoder_cfg.timm_kwargs.img_size)
    x = torch.empty(batch_size, 3, size, size, device="meta", requires_grad=True)
    saved: dict[int, torch.Tensor] = {}  # held, so that no id is reused while counting
    buffers = {id(b) for b in encoder.buffers()}  # (WEMoE's task vectors: counted as weights)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (isinstance(tensor, torch.nn.Parameter) or id(tensor) in buffers
                or id(tensor._base) in buffers):  # weights are counted as weights
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
    parameters: dict[str, int] | None = None  # (WEMoE: the routed model's beside the encoder's)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def pixel_bytes(encoder_cfg: DictConfig, images: int) -> int:
    """uint8 pixels of ``images`` images at the encoder's input size."""
    size = int(encoder_cfg.get("image_size") or encoder_cfg.timm_kwargs.img_size)
    return images * size * size * 3


def adaptation_memory(encoder_cfg: DictConfig, tasks: int, batch_size: int = 32,
                      vectors_dtype: str = "fp32", classes: int = 1000,
                      pixels: int = 0) -> MemoryModel:
    """The device memory of one layer-wise adaptation step (see the module docstring);
    ``classes``: total classes over the tasks (the experts' logits, the tinted heads);
    ``pixels``: bytes of test pixels kept on the device (0: streamed from the host)."""
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
        "test pixels on the device (uint8)": pixels,
    }
    return MemoryModel(str(encoder_cfg.name), tasks, batch_size, vectors_dtype, terms)


def device_memory(device: torch.device) -> int:
    """Bytes a run can still use on ``device``: CUDA's free memory; on the CPU, the system's
    available memory (MemAvailable), else its physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(label: str, model: MemoryModel, device: torch.device,
               limit_gib: float | None = None) -> None:
    """Refuse, before any work, a run whose memory model exceeds what ``device`` has free
    (or ``limit_gib``, the run's ``memory_limit_gib``), naming its largest terms."""
    from tintcli.errors import TintError

    limit = device_memory(device) if limit_gib is None else float(limit_gib) * GiB
    if model.total <= limit:
        return
    largest = sorted(model.terms.items(), key=lambda kv: -kv[1])[:2]
    terms = "; ".join(f"{name} {size(value)}" for name, value in largest)
    where = f"memory_limit_gib={limit_gib}" if limit_gib is not None else \
        f"{device.type} has {size(limit)} free"
    raise TintError(f"{label} needs about {size(model.total)} on {device.type} "
                    f"({model.encoder} × {model.tasks} tasks; largest: {terms}) and "
                    f"{where}\nRoute fewer blocks (method.blocks=[...]), lower "
                    "method.batch_size, set vectors_dtype=bf16, or use a larger device.")


def size(nbytes: float) -> str:
    """``2.31 GiB``, ``12.4 MiB``."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 1024 ** 2:.1f} MiB"
