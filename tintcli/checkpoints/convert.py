"""One filter per source format, each giving the state dict of tint's CLIP encoder: a timm
VisionTransformer whose ``head`` is CLIP's image projection (as in timm's
``vit_*_clip_quickgelu_224.openai`` models, less the zero bias timm gives it: the result has
exactly the tensors of OpenAI's visual tower). Every pool converts to this one layout, so every
merging method, lambda granularity and tinted layer works on all of them unchanged.

- ``from_open_clip``: OpenAI / open_clip ``CLIP`` state dicts (``visual.*``; the
  task_vectors ``ImageEncoder`` adds a ``model.`` prefix). timm's own filter does the work.
- ``from_hf_clip``: Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` (``vision_model.*`` in
  transformers 4.x, without the prefix in 5.x' ``CLIPVisionModel``); separate q, k, v are
  fused into timm's ``qkv``; the projection comes from the ``CLIPModel``
  (``visual_projection``).

Where a format stores a matrix transposed against tint's layout, ``STORED_TRANSPOSED`` says
so: merging methods that are not transpose-equivariant (ISO-CTS removes its common space from
the left of each matrix) decompose that matrix as the format stores it, as the authors' code
does on it (``orientation``, ``tintcli/methods.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from tintcli.errors import TintError
from tintcli.io import StateDict

# Per source format: tint's key -> the format's name for it, where the format stores that
# matrix transposed. open_clip keeps CLIP's image projection as ``visual.proj`` [width, embed]
# (applied as x @ proj); timm's ``head.weight`` and Hugging Face's
# ``visual_projection.weight`` are [embed, width]. Every other matrix (fused qkv as
# ``in_proj_weight``, out proj, MLP, positional embedding) is stored as tint stores it.
STORED_TRANSPOSED: dict[str, dict[str, str]] = {
    "open_clip": {"head.weight": "visual.proj"},
    "hf": {},
}
SOURCE_FORMATS = tuple(STORED_TRANSPOSED)

# text-tower leftovers the task_vectors ImageEncoder keeps beside the visual tower
CLIP_TEXT_LEFTOVERS = ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                       "ln_final.bias", "text_projection", "logit_scale")


def from_open_clip(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """OpenAI / open_clip CLIP (optionally under ``model.``) -> tint's timm CLIP encoder."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    prefix = next((k[: -len("visual.class_embedding")] for k in state
                   if k.endswith("visual.class_embedding")), None)
    if prefix is None:
        raise TintError("not an OpenAI/open_clip CLIP checkpoint: no visual.class_embedding")
    visual = {k[len(prefix):]: v for k, v in state.items()
              if k.startswith(prefix + "visual.")}
    out = dict(checkpoint_filter_fn(visual, model))
    out.pop("head.bias")  # timm's filter adds a zero bias the projection never had
    return out


def text_leftovers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The CLIP text-tower tensors a task_vectors checkpoint keeps (zero task vectors; the
    reference TIES counts them when it ranks the top k % of the whole flattened model)."""
    prefix = next((k[: -len("visual.class_embedding")] for k in state
                   if k.endswith("visual.class_embedding")), "")
    return {f"text.{name}": state[prefix + name] for name in CLIP_TEXT_LEFTOVERS
            if prefix + name in state}


_HF_BLOCK = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def from_hf_clip(state: Mapping[str, torch.Tensor],
                 projection: torch.Tensor | None = None) -> StateDict:
    """Hugging Face CLIP vision tower (+ ``visual_projection``) -> tint's timm CLIP encoder.

    ``projection`` is ``visual_projection.weight`` [embed, width]; a ``CLIPModel`` state dict
    carries it itself, a fine-tuned ``CLIPVisionModel`` takes it from the base model."""
    base = next((k[: -len("embeddings.class_embedding")] for k in state
                 if k.endswith("embeddings.class_embedding")), None)
    if base is None:
        raise TintError("not a Hugging Face CLIP vision checkpoint: no "
                        "embeddings.class_embedding")
    if projection is None:
        projection = state.get("visual_projection.weight")
    if projection is None:
        raise TintError("the Hugging Face CLIP checkpoint has no visual_projection; give the "
                        "base CLIPModel's projection")
    get = lambda name: state[base + name]  # noqa: E731
    out: StateDict = {
        "cls_token": get("embeddings.class_embedding").reshape(1, 1, -1),
        "pos_embed": get("embeddings.position_embedding.weight").unsqueeze(0),
        "patch_embed.proj.weight": get("embeddings.patch_embedding.weight"),
        "norm_pre.weight": get("pre_layrnorm.weight"), "norm_pre.bias": get("pre_layrnorm.bias"),
        "norm.weight": get("post_layernorm.weight"), "norm.bias": get("post_layernorm.bias"),
        "head.weight": projection,
    }
    layers = sorted({int(m.group(1)) for k in state
                     if (m := re.match(re.escape(base) + r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat(
                [get(f"{src}self_attn.{p}_proj.{part}") for p in ("q", "k", "v")])
            for hf, timm_name in _HF_BLOCK.items():
                out[f"{dst}{timm_name}.{part}"] = get(f"{src}{hf}.{part}")
    return out
