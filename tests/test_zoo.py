"""The tiny synthetic zoo: built once, reused from cache, validated on load."""

import json

import pytest
import torch
from conftest import compose_config
from rich.console import Console

from tintcli.errors import TintError
from tintcli.tasks import task_names
from tintcli.zoo import ensure_zoo, zoo_root


def _zoo(overrides=None, console=None):
    cfg = compose_config(overrides=overrides)
    zoo = ensure_zoo(cfg.encoder, cfg.tasks, task_names(cfg.tasks), torch.device("cpu"),
                     console or Console(quiet=True))
    return cfg, zoo


def test_tiny_zoo_is_complete_with_heads_at_the_logit_scale(tiny_cache):
    cfg, zoo = _zoo()
    assert zoo.tasks == ["signs", "digits", "textures"]
    for task in zoo.tasks:
        head = zoo.head(task)
        assert head.weight.shape[0] == {"signs": 24, "digits": 10, "textures": 20}[task]
        scale = torch.full((head.weight.shape[0],), float(cfg.encoder.logit_scale))
        assert torch.allclose(head.weight.norm(dim=1), scale)
    manifest = json.loads((zoo_root(cfg.encoder) / "pretrained" / "manifest.json").read_text())
    assert manifest["files"]["pretrained.safetensors"] == zoo.pretrained_sha256


def test_each_expert_beats_zero_shot_on_its_own_task_measured_from_its_files(tiny_cache):
    """Re-measured from the stored checkpoints, not read from the manifest: the recorded
    reference accuracies are those of these files, and fine-tuning helped every task."""
    from tintcli.encoders import build_encoder
    from tintcli.evaluation import accuracy
    from tintcli.runtime import Runtime
    from tintcli.tasks import load_split

    cfg, zoo = _zoo()
    pretrained, encoder = zoo.pretrained(), build_encoder(cfg.encoder)
    runtime = Runtime.create(torch.device("cpu"), cfg.encoder, "fp32")
    tests = {t: (lambda s: (s.images, s.labels))(load_split(cfg.tasks, cfg.encoder, t, "test"))
             for t in zoo.tasks}
    for task in zoo.tasks:
        head, entry = zoo.head(task), zoo.entries[task]
        encoder.load_state_dict(pretrained)
        zeroshot = accuracy(encoder, head, *tests[task], runtime)
        encoder.load_state_dict(zoo.expert(task, pretrained))
        expert = accuracy(encoder, head, *tests[task], runtime)
        assert (zeroshot, expert) == (entry.zeroshot_accuracy, entry.expert_accuracy), task
        assert expert > zeroshot, task


def test_second_use_reuses_the_cache(tiny_cache):
    cfg, _ = _zoo()
    files = sorted(zoo_root(cfg.encoder).rglob("*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    console = Console(record=True, width=120)
    _zoo(console=console)
    assert "Building" not in console.export_text()
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_a_number_written_as_int_or_float_is_the_same_recipe(tiny_cache):
    cfg, _ = _zoo()
    assert cfg.encoder.logit_scale == 30.0
    console = Console(record=True, width=200)
    _zoo(["encoder.logit_scale=30"], console)  # Hydra parses this as the int 30
    assert "Building" not in console.export_text()


def test_changed_recipe_builds_only_what_it_decides(tiny_cache):
    cfg, zoo = _zoo()
    console = Console(record=True, width=200)
    cfg2, zoo2 = _zoo(["encoder.zoo.finetune.steps=3", "tasks.names=[digits]"], console)
    assert zoo_root(cfg2.encoder) == zoo_root(cfg.encoder)  # same pretrained encoder
    assert zoo2.pretrained_sha256 == zoo.pretrained_sha256
    assert zoo2.entries["digits"].expert_sha256 != zoo.entries["digits"].expert_sha256
    text = console.export_text()
    assert "(1 expert(s))" in text and "pretraining" not in text


def test_corrupt_or_missing_checkpoints_fail_clearly(tiny_cache, tmp_path):
    _, zoo = _zoo()
    path = zoo.entries["digits"].expert_file
    original = path.read_bytes()
    try:
        path.write_bytes(original[:100])
        with pytest.raises(TintError, match="corrupt checkpoint for expert 'digits'"):
            zoo.expert("digits")
        path.unlink()
        with pytest.raises(TintError, match="missing checkpoint for expert 'digits'"):
            zoo.expert("digits")
    finally:
        path.write_bytes(original)
    with pytest.raises(TintError, match="no expert for task 'scenes'"):
        zoo.expert("scenes")


def test_an_expert_of_another_architecture_is_refused(tiny_cache):
    _, zoo = _zoo()
    pretrained = zoo.pretrained()
    wrong = dict(pretrained)
    wrong["norm.weight"] = torch.ones(7)
    from tintcli.io import check_same_layout

    with pytest.raises(TintError, match=r"norm.weight has shape \(7,\)"):
        check_same_layout(pretrained, wrong, "expert 'digits'")
    del wrong["norm.weight"]
    with pytest.raises(TintError, match="missing \\['norm.weight'\\]"):
        check_same_layout(pretrained, wrong, "expert 'digits'")


def test_heads_are_the_pretrained_caption_embeddings(tiny_cache):
    from safetensors.torch import load_file

    cfg, zoo = _zoo()
    pretrained = zoo_root(cfg.encoder) / "pretrained"
    manifest = json.loads((pretrained / "manifest.json").read_text())
    captions = load_file(pretrained / "captions.safetensors")["embeddings"]
    start, count = manifest["caption_offsets"]["digits"]
    rows = torch.nn.functional.normalize(captions[start : start + count], dim=-1)
    rows = rows * cfg.encoder.logit_scale
    head = zoo.head("digits")
    assert torch.allclose(head.weight, rows) and torch.equal(head.bias, torch.zeros(count))


def test_an_expert_with_nan_weights_is_refused_on_load(tiny_cache):
    """A checkpoint intact on disk (its sha256 matches) but trained into NaN."""
    import dataclasses

    from tintcli.io import save_state_dict, sha256_file

    _, zoo = _zoo()
    entry = zoo.entries["digits"]
    state = zoo.expert("digits")
    state["norm.weight"] = torch.full_like(state["norm.weight"], float("nan"))
    path = tiny_cache / "nan-expert.safetensors"
    save_state_dict(state, path)
    broken = dataclasses.replace(zoo, entries={**zoo.entries, "digits": dataclasses.replace(
        entry, expert_file=path, expert_sha256=sha256_file(path))})
    with pytest.raises(TintError, match="the expert for task 'digits' has NaN/inf weights in "
                                        "'norm.weight'"):
        broken.expert("digits")


def test_text_noise_turns_only_its_tasks_heads_by_the_set_angle(tiny_cache):
    """zoo.text_noise = rho: the head row sits at cosine sqrt(1 - rho^2) from its caption
    embedding, stays unit x logit scale, and only the tasks it names are rebuilt."""
    cfg, zoo = _zoo()
    console = Console(record=True, width=200)
    _, noisy = _zoo(["encoder.zoo.text_noise={default: 0.0, digits: 0.6}"], console)
    scale = cfg.encoder.logit_scale
    assert "(1 expert(s))" in console.export_text()  # digits only; the encoder is reused
    assert torch.equal(noisy.head("signs").weight, zoo.head("signs").weight)
    clean, turned = zoo.head("digits").weight / scale, noisy.head("digits").weight / scale
    assert torch.allclose(turned.norm(dim=1), torch.ones(10))
    assert torch.allclose((clean * turned).sum(1), torch.full((10,), 0.8), atol=1e-5)


@pytest.mark.parametrize("override, shown", [
    ("encoder.zoo.text_noise=1.5", "encoder.zoo.text_noise for 'scenes' is 1.5"),
    ("encoder.zoo.pretrain.caption_noise={default: high}",
     "encoder.zoo.pretrain.caption_noise for 'scenes' is high"),
    ("encoder.zoo.text_noise={digits: 2}", "encoder.zoo.text_noise for 'digits' is 2"),
])
def test_a_noise_level_outside_0_1_is_refused_before_any_work(tiny_cache, override, shown):
    with pytest.raises(TintError, match="must be a number in \\[0, 1\\]") as err:
        _zoo([override])
    assert str(err.value).startswith(shown)


def test_an_encoder_timm_cannot_build_is_refused_before_any_work(tiny_cache):
    """timm asserts on a width its heads do not divide; tint says so in one line and builds
    nothing (no zoo folder, no task data)."""
    cfg = compose_config(overrides=["encoder.timm_kwargs.embed_dim=33"])
    with pytest.raises(TintError) as err:
        ensure_zoo(cfg.encoder, cfg.tasks, task_names(cfg.tasks), torch.device("cpu"),
                   Console(quiet=True))
    assert str(err.value).splitlines()[0] == (
        "cannot build encoder 'synth_vit_tiny' with timm model 'vit_tiny_patch16_224': "
        "dim should be divisible by num_heads")
    assert not zoo_root(cfg.encoder).exists()


def test_realism_chooses_lambda_on_validation_and_reports_its_test_accuracy():
    """One task vector of ones: the merged weight is lambda itself. Validation peaks at 0.3,
    test at 0.7: the verdict takes 0.3 and reports test's figure there, not test's best."""
    from types import SimpleNamespace

    from tintcli.benchmark import _measure

    def score(state, split):
        lam = round(float(state["w"]), 1)
        peak = 0.3 if split == "val" else 0.7
        return {"a": 0.8 - abs(lam - peak)}

    zoo = SimpleNamespace(entries={"a": SimpleNamespace(zeroshot_accuracy=0.3,
                                                        expert_accuracy=0.99)})
    verdict = _measure(zoo, ["a"], {"w": torch.zeros(())}, {"a": {"w": torch.ones(())}}, score)
    assert verdict["best_lambda"] == "0.3" and verdict["best_lambda_chosen_on"] == "val"
    assert "(0.3) 40.0" in verdict["checks"][3]["what"]  # test at 0.3: 0.8 - 0.4
