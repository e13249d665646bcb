"""Real checkpoint formats, proven offline on tiny models made with the real libraries.

- task_vectors: a tiny open_clip CLIP wrapped in an ``ImageEncoder`` from a throwaway module
  named like the authors' (``src.modeling``), pickled whole with ``torch.save``, plus a
  pickled ``ClassificationHead``; the module is gone from ``sys.modules`` before tint reads.
- Hugging Face: a tiny ``CLIPModel`` and ``CLIPVisionModel`` saved with ``save_pretrained``.
- Each converted encoder gives the source library's image embeddings (max abs diff <= 1e-5,
  float32); a pickle that asks for ``os.system`` is refused and nothing runs.
- The real sizes: clip_vit_b32/b16/l14 built without weights have the real towers' keys,
  shapes and parameter counts.
"""

import pickle
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import compose_config
from torch import nn

from tintcli.checkpoints.convert import from_hf_clip, from_open_clip, text_leftovers
from tintcli.checkpoints.pickles import (
    UnsafePickle,
    load_pickled,
    module_state_dict,
    record_attribute,
)
from tintcli.encoders import build_encoder
from tintcli.heads import ZeroShotHead

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_timm_clip(embed: int = 16) -> nn.Module:
    model = timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False,
                              num_classes=embed, **TINY_TIMM).eval()
    model.head.register_parameter("bias", None)  # as encoder.head_bias=false builds it
    return model


def tiny_open_clip() -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8,
                                          image_size=32),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2,
                                      layers=1))
    for p in model.parameters():  # away from the init, so a swapped tensor shows
        p.data.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def authors_module(monkeypatch):
    """``src.modeling`` with ImageEncoder and ClassificationHead, as the task_vectors code
    defines them; removed from sys.modules before tint loads anything."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            delattr(self.model, "transformer")  # the text transformer is dropped (keep_lang)

        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = nn.Parameter(weights.clone())
            self.bias = nn.Parameter(torch.zeros_like(self.bias))

        def forward(self, inputs):
            if self.normalize:
                inputs = inputs / inputs.norm(dim=-1, keepdim=True)
            return super().forward(inputs)

    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(modeling, cls.__name__, cls)
    src.modeling = modeling
    monkeypatch.setitem(sys.modules, "src", src)
    monkeypatch.setitem(sys.modules, "src.modeling", modeling)
    return modeling


def test_a_pickled_task_vectors_encoder_and_head_convert_exactly(authors_module, tmp_path):
    encoder = authors_module.ImageEncoder(tiny_open_clip())
    head = authors_module.ClassificationHead(True, torch.randn(5, 16) * 3)
    torch.save(encoder, tmp_path / "finetuned.pt")
    torch.save(head, tmp_path / "head_MNIST.pt")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected_features = encoder(images)
        expected_logits = head(expected_features)
    del sys.modules["src.modeling"], sys.modules["src"]  # tint needs no authors' code

    record = load_pickled(tmp_path / "finetuned.pt", "the MNIST expert")
    state = module_state_dict(record)
    assert "model.visual.conv1.weight" in state and "model.transformer.resblocks.0" not in str(
        list(state))
    assert set(text_leftovers(state)) == {f"text.{k}" for k in (
        "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
        "text_projection", "logit_scale")}
    timm_model = tiny_timm_clip()
    timm_model.load_state_dict(from_open_clip(state, timm_model))
    head_record = load_pickled(tmp_path / "head_MNIST.pt", "the MNIST head")
    assert record_attribute(head_record, "normalize") is True
    ours_head = ZeroShotHead.from_state_dict(dict(module_state_dict(head_record)))
    with torch.no_grad():
        features = timm_model(images)
        logits = ours_head(features)
    assert (features - expected_features).abs().max() <= 1e-5
    assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("wrap", ["plain", "inside a state dict", "torch.save"])
def test_a_pickle_that_calls_os_system_is_refused_and_nothing_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "finetuned.pt"
    payload = Exploit(marker)
    if wrap == "plain":
        path.write_bytes(pickle.dumps(payload))
    else:
        obj = {"weight": torch.zeros(2), "evil": payload} if wrap != "plain" else payload
        torch.save(obj, path)
    with pytest.raises(UnsafePickle, match=r"asks for (posix|os)\.system"):
        load_pickled(path, "a malicious checkpoint")
    assert not marker.exists()


def test_a_class_called_with_arguments_is_refused(tmp_path):
    """A pickled call of an unknown class (what a gadget chain looks like) never runs."""
    class Gadget:
        def __reduce__(self):
            return (Target, ("rm -rf /",))

    class Target:
        def __init__(self, arg):
            raise AssertionError("must never run")

    Target.__module__ = Gadget.__module__ = "evil.module"
    Target.__qualname__, Gadget.__qualname__ = "Target", "Gadget"
    evil, module = types.ModuleType("evil"), types.ModuleType("evil.module")
    module.Target, evil.module = Target, module
    sys.modules.update({"evil": evil, "evil.module": module})
    try:
        (tmp_path / "x.pt").write_bytes(pickle.dumps(Gadget()))
    finally:
        del sys.modules["evil.module"], sys.modules["evil"]
    with pytest.raises(UnsafePickle, match="calls evil.module.Target") as err:
        load_pickled(tmp_path / "x.pt", "a gadget")
    # the first line names the file and what it was for: with 20 tasks, which one to delete
    first, hint = str(err.value).splitlines()
    assert first == (f"{tmp_path / 'x.pt'} (a gadget) is a pickle that calls "
                     "evil.module.Target, which tint refuses to run")
    assert hint.startswith("tint loads no code from checkpoints")


def tiny_hf_clip():
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def _safetensors_state(folder):
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")
    return load_file(file)


def test_hf_clip_model_and_vision_model_convert_exactly(tmp_path):
    model = tiny_hf_clip()
    model.save_pretrained(tmp_path / "base")
    vision = transformers.CLIPVisionModel(model.config.vision_config).eval()
    prefix = "vision_model." if any(k.startswith("vision_model.")
                                    for k in vision.state_dict()) else ""
    vision.load_state_dict({prefix + k: v for k, v in model.vision_model.state_dict().items()})
    vision.save_pretrained(tmp_path / "expert")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)

    base = _safetensors_state(tmp_path / "base")
    timm_model = tiny_timm_clip()
    timm_model.load_state_dict(from_hf_clip(base))
    with torch.no_grad():
        assert (timm_model(images) - expected).abs().max() <= 1e-5
    # a fine-tuned CLIPVisionModel takes its projection from the base CLIPModel
    expert = _safetensors_state(tmp_path / "expert")
    timm_model.load_state_dict(from_hf_clip(expert, base["visual_projection.weight"]))
    with torch.no_grad():
        assert (timm_model(images) - expected).abs().max() <= 1e-5
    # transformers 4.x writes CLIPVisionModel under vision_model., 5.x without it: both
    for layout in ({k.removeprefix("vision_model."): v for k, v in expert.items()},
                   {f"vision_model.{k.removeprefix('vision_model.')}": v
                    for k, v in expert.items()}):
        timm_model.load_state_dict(from_hf_clip(layout, base["visual_projection.weight"]))
        with torch.no_grad():
            assert (timm_model(images) - expected).abs().max() <= 1e-5


# The real towers: keys, shapes and parameter counts of OpenAI's visual encoders (open_clip's
# architectures, built on the meta device: no weights, no memory).
REAL = {"clip_vit_b32": ("ViT-B-32-quickgelu", 87_849_216),
        "clip_vit_b16": ("ViT-B-16-quickgelu", 86_192_640),
        "clip_vit_l14": ("ViT-L-14-quickgelu", 303_966_208)}


@pytest.mark.parametrize("encoder", list(REAL))
def test_real_size_encoders_have_the_real_towers_keys_and_sizes(encoder):
    name, params = REAL[encoder]
    cfg = compose_config(overrides=[f"encoder={encoder}"], tiny=False).encoder
    with torch.device("meta"):
        ours = build_encoder(cfg)
        real = open_clip.create_model(name, pretrained=None, device="meta")
    converted = from_open_clip(real.state_dict(), ours)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    visual = sum(p.numel() for p in real.visual.parameters())
    assert visual == params
    assert sum(p.numel() for p in ours.parameters()) == params  # no more, no less
    assert len(converted) == len(real.visual.state_dict())  # 152 for B/32
    acts = {type(m).__name__ for m in ours.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    assert F.gelu is not None


def tiny_clip_tokenizer(folder):
    """A real CLIPTokenizer over a letters-only BPE vocabulary (no merges), saved as the
    hub's files (vocab.json, merges.txt)."""
    import json
    import string

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_text_tower_heads_follow_the_task_vectors_recipe(tmp_path):
    """Per class: embed each filled template, normalise, average, normalise; rows scaled by
    exp(logit_scale). Checked against a port of the reference's zeroshot head code."""
    from tintcli.heads import text_tower_head

    model = tiny_hf_clip()
    tokenizer = tiny_clip_tokenizer(tmp_path / "tok")
    classnames, templates = ["cat", "dog", "owl"], ["a {}", "the {} here", "{}"]
    head = text_tower_head(model, tokenizer, classnames, templates)

    with torch.no_grad():  # the reference: task_vectors' get_zeroshot_classifier
        weights = []
        for name in classnames:
            tokens = tokenizer([t.format(name) for t in templates], padding=True,
                               return_tensors="pt")
            emb = model.get_text_features(**tokens)
            emb = getattr(emb, "pooler_output", emb)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0, keepdim=True)
            weights.append(emb / emb.norm())
        weights = torch.cat(weights) * model.logit_scale.exp()
    assert torch.allclose(head.weight, weights, atol=1e-6)
    assert torch.equal(head.bias, torch.zeros(3))
    features = torch.randn(4, 16)
    assert torch.allclose(head(features), F.normalize(features, dim=-1) @ weights.T, atol=1e-5)
