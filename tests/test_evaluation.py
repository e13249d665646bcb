"""Accuracy summaries: averages and normalised accuracy."""

import pytest

from tintcli.evaluation import summarize


def test_normalized_accuracy_is_merged_over_expert():
    out = summarize({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9})
    assert out["average"] == pytest.approx(0.7)
    assert out["normalized"] == {"a": 0.5, "b": 1.0}
    assert out["normalized_average"] == pytest.approx(0.75)


def test_an_expert_at_zero_accuracy_has_no_normalized_accuracy():
    out = summarize({"a": 0.0, "b": 0.4}, {"a": 0.0, "b": 0.8})
    assert out["normalized"]["a"] is None
    assert out["normalized_average"] == pytest.approx(0.5)
    assert summarize({"a": 0.0}, {"a": 0.0})["normalized_average"] is None


def test_the_device_side_inputs_are_what_the_experts_were_trained_on():
    """Every forward normalises uint8 pixels with Runtime.inputs, the zoo's training included
    (laid out channels-last there, as it always trained). The numbers are x/255, then
    (x - mean) / std in float32, bit for bit: other arithmetic would drift every score."""
    import torch
    from omegaconf import OmegaConf

    from tintcli.runtime import Runtime
    from tintcli.zoo import _train_inputs

    cfg = OmegaConf.create({"mean": [0.48145466, 0.4578275, 0.40821073],
                            "std": [0.26862954, 0.26130258, 0.27577711]})
    pixels = torch.randint(0, 256, (5, 7, 7, 3), dtype=torch.uint8)
    runtime = Runtime.create(torch.device("cpu"), cfg, "fp32")
    mean = torch.tensor(list(cfg.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.std)).view(1, 3, 1, 1)
    expected = (pixels.permute(0, 3, 1, 2).float().div_(255) - mean) / std
    assert torch.equal(runtime.inputs(pixels), expected)
    assert runtime.inputs(pixels).is_contiguous()
    trained_on = _train_inputs(pixels, cfg)
    assert torch.equal(trained_on, expected) and trained_on.stride() == expected.stride()


def test_accuracy_counts_every_batch_and_the_last_partial_one():
    """Labels are matched batch for batch (batch 4 over 10 images: 4 + 4 + 2)."""
    import torch
    from omegaconf import OmegaConf

    from tintcli.evaluation import accuracy
    from tintcli.runtime import Runtime

    cfg = OmegaConf.create({"mean": [0.0] * 3, "std": [1.0] * 3})
    runtime = Runtime.create(torch.device("cpu"), cfg, "fp32", batch_size=4)
    pixels = torch.zeros(10, 2, 2, 3, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8) * 20  # the class is in one pixel

    class Reader(torch.nn.Module):  # predicts class 1 when the pixel is bright, else 0
        def forward(self, x):
            bright = (x[:, 0, 0, 0] > 0.5).float()
            return torch.stack([1 - bright, bright], dim=-1)

    labels = (torch.arange(10) * 20 > 127).long()
    assert accuracy(Reader(), torch.nn.Identity(), pixels, labels, runtime) == 1.0
    labels[-1] = 0  # one wrong label in the partial last batch
    assert accuracy(Reader(), torch.nn.Identity(), pixels, labels, runtime) == 0.9


@pytest.mark.parametrize(("name", "dtype"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_precision_decides_the_forwards_dtype(name, dtype):
    import torch
    from omegaconf import OmegaConf

    from tintcli.runtime import Runtime, resolve_precision

    runtime = Runtime.create(torch.device("cpu"), OmegaConf.create({"mean": [0] * 3,
                                                                    "std": [1] * 3}), name)
    with runtime.autocast():
        out = torch.nn.Linear(4, 2)(torch.ones(3, 4))
    assert out.dtype == getattr(torch, dtype)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # exact on the CPU
    with pytest.raises(Exception, match="precision=fp8 is not one tint knows"):
        resolve_precision("fp8", torch.device("cpu"))


def test_memory_model_counts_the_real_encoders_and_activations():
    """Task vectors: tasks x the encoder's parameters (ViT-B/32: 87,849,216) x bytes; the
    activations counted on the meta device bound those of a real forward from above, closely
    (meta runs attention unfused, which keeps the attention matrix)."""
    import torch
    from conftest import compose_config

    from tintcli.encoders import build_encoder
    from tintcli.memory import activation_bytes, adaptation_memory

    b32 = compose_config(overrides=["encoder=clip_vit_b32"], tiny=False).encoder
    model = adaptation_memory(b32, tasks=8, batch_size=32, vectors_dtype="bf16")
    assert model.terms["task vectors (8 x bf16)"] == 8 * 87_849_216 * 2
    assert model.terms["theta_0 (fp32)"] == 87_849_216 * 4

    tiny = compose_config().encoder
    encoder = build_encoder(tiny)
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(id(t), t) if not isinstance(t, torch.nn.Parameter)
            else t, lambda t: t):
        encoder(torch.randn(3, 3, 32, 32, requires_grad=True))
    real = sum(t.numel() * t.element_size() for t in saved.values())
    assert real <= activation_bytes(tiny, 3) <= 1.1 * real


def test_the_test_pixels_stay_on_the_device_by_the_residency_rule(monkeypatch):
    """runtime.resident_pixels on a (pretended) CUDA device with 8 GiB free: auto keeps pixels
    that fit in a quarter of it and streams larger ones; always keeps them, and refuses in one
    error line what cannot fit; never streams; the CPU keeps nothing "resident"."""
    import torch
    from omegaconf import OmegaConf

    from tintcli.errors import TintError
    from tintcli.runtime import Runtime

    gib = 1024 ** 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    cuda = {rule: Runtime(torch.device("cuda"), resident_pixels=rule)
            for rule in ("auto", "always", "never")}
    assert cuda["auto"].keeps_resident(2 * gib) and not cuda["auto"].keeps_resident(3 * gib)
    assert cuda["always"].keeps_resident(7 * gib)
    with pytest.raises(TintError, match=r"^runtime.resident_pixels=always: the test pixels need "
                                        r"9.00 GiB and cuda has 8.00 GiB free\n"):
        cuda["always"].keeps_resident(9 * gib)
    assert not cuda["never"].keeps_resident(1)
    assert not Runtime(torch.device("cpu"), resident_pixels="always").keeps_resident(1)
    with pytest.raises(TintError, match="runtime.resident_pixels=sometimes is not a choice"):
        Runtime.create(torch.device("cpu"), OmegaConf.create({"mean": [0] * 3, "std": [1] * 3}),
                       resident_pixels="sometimes")
