"""Model pools end to end: tiny task_vectors and Hugging Face pools, made with the real
libraries in the real formats, merged by `tint merge` through every method, converted with
`tint convert`, and checked for the mistakes a user makes (a missing file, a swapped map).

The tiny experts are the pretrained tiny CLIP with seeded noise added, and each task's head
is the normalised class means of its expert's features on the task's test images: so every
expert beats zero-shot on its own task, as real ones do.
"""

import copy
import io
import json
import re
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from test_checkpoints import tiny_clip_tokenizer, tiny_hf_clip, tiny_open_clip
from torch import nn

from tintcli.runtime import Runtime
from tintcli.tasks.generated import load_synthetic

pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TASKS = ["signs", "digits", "textures"]
DIRS = {"signs": "Signs", "digits": "Digits", "textures": "Textures"}  # the release's names
CLIP_TINY = ["encoder=clip_vit_b32", "tasks=synth_tiny", "encoder.num_classes=16",
             "encoder.image_size=32",
             "encoder.timm_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, "
             "num_heads: 2}"]
FAST = ["method.methods.adamerging_task.steps=2", "method.methods.adamerging.steps=2",
        "method.methods.adamerging_pp.steps=2", "method.methods.tinting.epochs=1",
        "method.methods.tinting_pp.epochs=1", "method.methods.surgery.epochs=1",
        "method.methods.surgery_symerge.epochs=1", "method.methods.prob_surgery.epochs=1",
        "method.methods.wemoe.steps=2", "method.methods.lot.exemplars=4"]


def _test_images(task):
    cfg = compose_config(overrides=CLIP_TINY, tiny=False)
    split = load_synthetic(task, "test", cfg.tasks.test_size, 32, cfg.tasks.seed)
    inputs = Runtime.create(torch.device("cpu"), cfg.encoder, "fp32").inputs(split.images)
    return inputs, split.labels, split.num_classes


def _class_mean_head(features, labels, classes):
    means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
    return F.normalize(means, dim=-1) * 100.0


def _perturbed(model, seed):
    expert = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in expert.parameters():
        p.data.add_(0.1 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
    return expert


class ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(nn.Linear):
    def __init__(self, weights):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = True
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(torch.zeros(weights.shape[0]))


@pytest.fixture(scope="module")
def release(tmp_path_factory, tiny_cache):
    return make_release(tmp_path_factory.mktemp("task_vectors"), DIRS, _test_images)


def make_release(root, dirs, test_images):
    """A tiny task_vectors release: zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt, pickled
    from a throwaway ``src.modeling``. ``dirs``: task -> the release's name for it;
    ``test_images(task)``: (encoder inputs, labels, classes) for the class-mean heads."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(modeling, cls.__name__, cls)
    src.modeling = modeling
    sys.modules.update({"src": src, "src.modeling": modeling})
    try:
        base = tiny_open_clip()
        torch.save(ImageEncoder(copy.deepcopy(base)), root / "zeroshot.pt")
        for i, (task, name) in enumerate(dirs.items()):
            expert = ImageEncoder(_perturbed(base, seed=i))
            (root / name).mkdir()
            torch.save(expert, root / name / "finetuned.pt")
            x, y, classes = test_images(task)
            with torch.no_grad():  # classes a tiny split lacks get logit 0
                weights = torch.nan_to_num(_class_mean_head(expert(x), y, classes))
            torch.save(ClassificationHead(weights), root / f"head_{name}.pt")
    finally:
        del sys.modules["src.modeling"], sys.modules["src"]
    return root


@pytest.fixture(scope="module")
def hf_pool(tmp_path_factory, tiny_cache):
    return make_hf_pool(tmp_path_factory.mktemp("hf"))


def make_hf_pool(root):
    """A tiny FusionBench-style pool: base CLIPModel + CLIPVisionModel experts (folders)."""
    from safetensors.torch import save_file

    base = tiny_hf_clip()
    base.save_pretrained(root / "base")
    tiny_clip_tokenizer(root / "tokenizer").save_pretrained(root / "base")
    (root / "heads").mkdir()
    for i, task in enumerate(TASKS):
        vision = transformers.CLIPVisionModel(base.config.vision_config).eval()
        prefix = "vision_model." if any(k.startswith("vision_model.")
                                        for k in vision.state_dict()) else ""
        vision.load_state_dict({prefix + k: v for k, v in
                                _perturbed(base.vision_model, seed=i).state_dict().items()})
        vision.save_pretrained(root / f"clip_{task}")
        x, y, classes = _test_images(task)
        with torch.no_grad():
            pooled = vision(pixel_values=x).pooler_output
            features = base.visual_projection(pooled)
        save_file({"weight": _class_mean_head(features, y, classes).contiguous(),
                   "bias": torch.zeros(classes)}, root / "heads" / f"{task}.safetensors")
    return root


def _pool_args(release):
    dirs = "{" + ", ".join(f"{t}: {d}" for t, d in DIRS.items()) + "}"
    return ["pool=task_vectors", f"pool.path={release}", f"pool.dirs={dirs}"]


def test_merge_over_a_task_vectors_pool_runs_every_method(tint_here, tmp_path, release):
    out = tint_here("merge", *CLIP_TINY, *_pool_args(release), "method=all", *FAST,
                   f"hydra.run.dir={tmp_path / 'tv'}")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "tv" / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert len(names) == 2 + 21 and "Model Tinting++" in names and "emr" in names
    assert {"WEMoE", "LOT Merging", "ProbSurgery w/ AdaMerging"} <= set(names)
    assert results["pool"]["kind"] == "task_vectors" and results["realism"] is None
    # open_clip's format stores the projection transposed: ISO-CTS follows it, and says so
    assert results["layout"]["source_format"] == "open_clip"
    assert results["layout"]["stored_transposed"] == {"head.weight": "visual.proj"}
    iso_cts = next(r for r in results["rows"] if r.get("method") == "iso_cts")
    assert iso_cts["params"]["orientation"] == "open_clip"
    zeroshot, experts = results["rows"][0], results["rows"][1]
    assert all(experts["accuracy"][t] > zeroshot["accuracy"][t] for t in TASKS)
    assert set(results["checkpoints"]["experts"]) == set(TASKS)
    assert "benchmark realism" not in out.stdout  # only the synthetic zoo has targets


def test_merge_over_an_hf_pool_and_convert_to_local_give_the_same_numbers(
        tint_here, tmp_path, hf_pool, release):
    hf = ["pool=hf", f"pool.base={hf_pool / 'base'}",
          f"pool.experts='{hf_pool}/clip_{{task}}'", f"pool.heads={hf_pool / 'heads'}"]
    out = tint_here("merge", *CLIP_TINY, *hf, "method=ties", f"hydra.run.dir={tmp_path / 'hf'}")
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "hf" / "results.json").read_text())
    rows = results["rows"]
    assert rows[1]["average"] > rows[0]["average"]
    assert results["layout"]["source_format"] == "hf"
    # a local pool converted from it keeps its source format (pool.json), so ISO-CTS does too
    out = tint_here("convert", *CLIP_TINY, *hf, f"out={tmp_path / 'from_hf'}")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "from_hf" / "pool.json").read_text())["source_format"] == "hf"

    out = tint_here("convert", *CLIP_TINY, *_pool_args(release), f"out={tmp_path / 'local'}")
    assert out.returncode == 0, out.stderr
    # a pool's own task names, not a task set's (real names such as mnist come with issue 12)
    out = tint_here("convert", *CLIP_TINY, *_pool_args(release), "names=[digits,signs]",
                   f"out={tmp_path / 'two'}")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "experts").iterdir()) == [
        "digits.safetensors", "signs.safetensors"]
    for pool, folder in ((_pool_args(release), "a"), (["pool=local",
                                                      f"pool.path={tmp_path / 'local'}"], "b")):
        out = tint_here("merge", *CLIP_TINY, *pool, "method=ties",
                       f"hydra.run.dir={tmp_path / folder}")
        assert out.returncode == 0, out.stderr
    a, b = (json.loads((tmp_path / f / "results.json").read_text()) for f in "ab")
    assert [r["accuracy"] for r in a["rows"]] == [r["accuracy"] for r in b["rows"]]
    assert a["layout"] == b["layout"] and b["layout"]["source_format"] == "open_clip"
    from tintcli.pools import _converted_from

    assert _converted_from(tmp_path / "from_hf") == "hf"


def test_a_missing_expert_names_the_task_and_the_path(tint_here, tmp_path, release):
    args = _pool_args(release)
    args[-1] = "pool.dirs={signs: Signs, digits: MNIST, textures: Textures}"
    out = tint_here("merge", *CLIP_TINY, *args, f"hydra.run.dir={tmp_path / 'm'}")
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == (
        "error: the task set and the task_vectors pool do not cover the same tasks: "
        f"no expert for digits ({release / 'MNIST' / 'finetuned.pt'} does not exist)")
    assert "The pool has: Digits, Signs, Textures." in out.stderr


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, release):
    """The release with the Signs and Digits experts in each other's folders, their heads
    where they belong: the swap the expert-vs-zero-shot guard exists for. (A swap in
    pool.dirs swaps the heads too, and those differ in class count: that is refused earlier,
    by the head check below.)"""
    root = tmp_path_factory.mktemp("swapped") / "release"
    shutil.copytree(release, root)
    (root / "Signs" / "finetuned.pt").rename(root / "tmp.pt")
    (root / "Digits" / "finetuned.pt").rename(root / "Signs" / "finetuned.pt")
    (root / "tmp.pt").rename(root / "Digits" / "finetuned.pt")
    return root


def test_a_swapped_task_map_is_refused(tint_here, tmp_path, swapped):
    out = tint_here("merge", *CLIP_TINY, *_pool_args(swapped), f"hydra.run.dir={tmp_path / 's'}")
    assert out.returncode == 2
    first = out.stderr.splitlines()[0]
    assert first.startswith("error: ") and "no better than zero-shot" in first
    assert "pool.check_experts=false makes this a warning" in out.stderr


def test_check_experts_false_makes_a_swapped_map_a_warning(tint_here, tmp_path, swapped):
    """For a smoke run whose tiny test split ties: the same finding, as a warning line, and
    the run goes on to its rows."""
    out = tint_here("merge", *CLIP_TINY, *_pool_args(swapped), "pool.check_experts=false",
                   "method=task_arithmetic", f"hydra.run.dir={tmp_path / 'w'}")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings and all(
        "no better than zero-shot" in w and "(pool.check_experts=false: going on)" in w
        for w in warnings)
    assert any(w.startswith("warning: the expert for task 'digits' scores") for w in warnings)
    results = json.loads((tmp_path / "w" / "results.json").read_text())
    assert [r["name"] for r in results["rows"]][:2] == ["zero-shot", "experts"]
    assert len(results["rows"]) == 3 and results["pool"]["check_experts"] is False


def test_check_experts_refuses_or_warns():
    """The guard itself, both ways, on measured (zero-shot, expert) accuracies."""
    from rich.console import Console

    from tintcli.errors import TintError
    from tintcli.pools import check_experts_beat_zero_shot

    accuracies = {"signs": (0.40, 0.90), "digits": (0.50, 0.50)}  # digits: a tie
    with pytest.raises(TintError) as err:
        check_experts_beat_zero_shot(accuracies, "local")
    assert str(err.value).splitlines()[0] == (
        "the expert for task 'digits' scores 50.0% on its own test split, no better than "
        "zero-shot (50.0%)")
    console = Console(file=io.StringIO(), width=80)
    check_experts_beat_zero_shot(accuracies, "local", refuse=False, console=console)
    assert console.file.getvalue().splitlines() == [
        "warning: the expert for task 'digits' scores 50.0% on its own test split, no better "
        "than zero-shot (50.0%) (pool.check_experts=false: going on)"]
    check_experts_beat_zero_shot({"signs": (0.4, 0.9)}, "local")  # nothing to say


def test_every_pool_config_checks_experts_by_default():
    for pool in ("synth", "task_vectors", "hf", "local"):
        assert compose_config(overrides=[f"pool={pool}"]).pool.check_experts is True


def test_an_unsafe_pickle_in_a_pool_names_the_file_and_the_task(tmp_path, release):
    """With 20 tasks the user must know which file to delete: the first line names it and
    what it is for (an expert, a head, the pretrained encoder); nothing in it runs."""
    from test_checkpoints import Exploit

    from tintcli.checkpoints.pickles import UnsafePickle
    from tintcli.encoders import build_encoder
    from tintcli.pools import open_pool

    root = tmp_path / "release"
    shutil.copytree(release, root)
    marker = tmp_path / "pwned"
    cfg = compose_config(overrides=[*CLIP_TINY, *_pool_args(root)], tiny=False)
    pool = open_pool(cfg.pool, TASKS, build_encoder(cfg.encoder), cfg.encoder.name, cfg.tasks)
    for path, what, load in (
            (root / "Digits" / "finetuned.pt", "the expert for task 'digits'",
             lambda: pool.expert("digits")),
            (root / "head_Textures.pt", "the head for task 'textures'",
             lambda: pool.head("textures")),
            (root / "zeroshot.pt", "the pretrained encoder", pool.pretrained)):
        torch.save({"weight": torch.zeros(2), "evil": Exploit(marker)}, path)
        with pytest.raises(UnsafePickle) as err:
            load()
        lines = str(err.value).splitlines()
        assert re.fullmatch(re.escape(f"{path} ({what}) is a pickle that asks for ")
                            + r"(posix|os)\.system, which tint refuses to run", lines[0])
        assert lines[1].startswith("This file may be malicious")
    assert not marker.exists()


def test_a_head_whose_class_count_differs_from_its_task_is_refused(tint_here, tmp_path,
                                                                   release, hf_pool):
    """Before any evaluation: the error names the task, both counts and where to look. The
    classic pool.dirs swap trips it (signs has 24 classes, digits 10)."""
    from tintcli.encoders import build_encoder
    from tintcli.errors import TintError
    from tintcli.pools import open_pool
    from tintcli.tasks.synthetic import SYNTH_FAMILIES

    assert SYNTH_FAMILIES["signs"].num_classes == 24 and SYNTH_FAMILIES["digits"].num_classes == 10
    args = _pool_args(release)
    args[-1] = "pool.dirs={signs: Digits, digits: Signs, textures: Textures}"
    out = tint_here("merge", *CLIP_TINY, *args, f"hydra.run.dir={tmp_path / 'd'}")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0] == ("error: the head for task 'signs' has 10 classes, but the task has 24 "
                        "classes")
    assert str(release / "head_Digits.pt") in lines[1] and "pool.dirs" in lines[1]
    assert "Traceback" not in out.stderr

    def first_line(overrides, task, tasks=TASKS):
        cfg = compose_config(overrides=[*CLIP_TINY, *overrides], tiny=False)
        pool = open_pool(cfg.pool, tasks, build_encoder(cfg.encoder), cfg.encoder.name,
                         cfg.tasks)
        with pytest.raises(TintError) as err:
            pool.head(task)
        return str(err.value).splitlines()[0]

    # a real task's class names (conf/task/mnist.yaml: 10) against a 24-class head
    assert first_line(["tasks=vit8", "tasks.names=[mnist]", "pool=task_vectors",
                       f"pool.path={release}", "pool.dirs={mnist: Signs}"], "mnist",
                      ["mnist"]) == (
        "the head for task 'mnist' has 24 classes, but the task has 10 class names")
    # a heads folder (pool.heads of an hf pool; a local pool's heads/ likewise)
    heads = tmp_path / "heads"
    shutil.copytree(hf_pool / "heads", heads)
    shutil.copy(heads / "signs.safetensors", heads / "textures.safetensors")
    hf = ["pool=hf", f"pool.base={hf_pool / 'base'}", f"pool.experts='{hf_pool}/clip_{{task}}'",
          f"pool.heads={heads}"]
    assert first_line(hf, "textures") == (
        "the head for task 'textures' has 24 classes, but the task has 20 classes")
    local = tmp_path / "local"
    shutil.copytree(heads, local / "heads")
    (local / "experts").mkdir()
    for task in TASKS:
        (local / "experts" / f"{task}.safetensors").touch()
    (local / "pretrained.safetensors").touch()
    assert first_line(["pool=local", f"pool.path={local}"], "textures") == (
        "the head for task 'textures' has 24 classes, but the task has 20 classes")


def test_an_expert_of_another_architecture_names_the_task_and_file(tint_here, tmp_path,
                                                                   release):
    out = tint_here("merge", *CLIP_TINY, "encoder.timm_kwargs.depth=3", *_pool_args(release),
                   f"hydra.run.dir={tmp_path / 'x'}")
    assert out.returncode == 2
    assert out.stderr.splitlines()[0].startswith(
        f"error: the pretrained encoder ({release / 'zeroshot.pt'}) does not match the keys of "
        "encoder=clip_vit_b32 (check encoder.timm_kwargs): missing ['blocks.2.")


def test_hf_pool_without_a_network_says_what_to_set(tint_here, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tint_here("merge", *CLIP_TINY, "pool=hf", f"hydra.run.dir={tmp_path / 'n'}")
    assert out.returncode == 2
    first = out.stderr.splitlines()[0]
    assert first.startswith("error: cannot get openai/clip-vit-base-patch32")
    assert "HF_HUB_OFFLINE" in out.stderr and "Traceback" not in out.stderr


def test_hf_heads_come_from_the_text_tower_with_the_given_names_and_templates(
        tint_here, tmp_path, hf_pool):
    from safetensors.torch import load_file

    from tintcli.heads import text_tower_head

    hf = ["pool=hf", f"pool.base={hf_pool / 'base'}", f"pool.experts='{hf_pool}/clip_{{task}}'"]
    out = tint_here("convert", *CLIP_TINY, *hf, f"out={tmp_path / 'none'}")
    assert out.returncode == 2
    assert out.stderr.splitlines()[0] == (
        "error: hf pool: no zero-shot heads for signs, digits, textures: give pool.classnames "
        "and pool.templates per task (the text tower embeds them; a conf/task/ YAML has them), "
        "or pool.heads=<folder of <task>.safetensors>")
    names = {"signs": ["stop", "yield"], "digits": ["zero", "one", "two"],
             "textures": ["dots", "lines"]}
    classnames = "{" + ", ".join(f"{t}: [{', '.join(n)}]" for t, n in names.items()) + "}"
    templates = "{" + ", ".join(f"{t}: ['a {{}}', 'the {{}} sign']" for t in names) + "}"
    out = tint_here("convert", *CLIP_TINY, *hf, f"pool.classnames={classnames}",
                   f"pool.templates={templates}", f"out={tmp_path / 'text'}")
    assert out.returncode == 0, out.stderr
    model = transformers.CLIPModel.from_pretrained(hf_pool / "base").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_pool / "base")
    for task, classes in names.items():
        expected = text_tower_head(model, tokenizer, classes, ["a {}", "the {} sign"])
        saved = load_file(tmp_path / "text" / "heads" / f"{task}.safetensors")
        assert torch.allclose(saved["weight"], expected.weight, atol=1e-6)


def test_ties_over_a_task_vectors_pool_is_the_reference_over_the_whole_checkpoint(release):
    """The reference flattens each whole ImageEncoder state dict (visual tower and CLIP's
    text leftovers) before it trims the top 20 %: with ties_scope=full tint's TIES gives its
    visual tower entry for entry; the visual-only convention keeps other entries."""
    from test_merging import _reference_ties

    from tintcli.checkpoints.convert import from_open_clip
    from tintcli.checkpoints.pickles import load_pickled, module_state_dict
    from tintcli.encoders import build_encoder
    from tintcli.io import encoder_entries
    from tintcli.merging import ties_merge
    from tintcli.pools import open_pool

    raw_pre = module_state_dict(load_pickled(release / "zeroshot.pt", "zero-shot"))
    raw = {t: module_state_dict(load_pickled(release / DIRS[t] / "finetuned.pt", t))
           for t in TASKS}
    keys = list(raw_pre)
    assert any(k.startswith("model.token_embedding") for k in keys)
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])  # noqa: E731
    merged = _reference_ties(flat(raw_pre), torch.stack([flat(raw[t]) - flat(raw_pre)
                                                         for t in TASKS]), 20, "sum", 0.3)
    sizes = [raw_pre[k].numel() for k in keys]
    unflat = {k: v.view(raw_pre[k].shape) for k, v in zip(keys, merged.split(sizes),
                                                           strict=True)}
    cfg = compose_config(overrides=[*CLIP_TINY, *_pool_args(release)], tiny=False)
    encoder = build_encoder(cfg.encoder)
    expected = from_open_clip(unflat, encoder)

    def ours(scope):
        cfg.pool.ties_scope = scope
        pool = open_pool(cfg.pool, TASKS, encoder, cfg.encoder.name)
        pre = pool.pretrained()
        out = ties_merge(pre, {t: pool.expert(t, pre) for t in TASKS}, top_k=20, merge="sum",
                         lam=0.3)
        return encoder_entries(out)

    full = ours("full")
    assert full.keys() == expected.keys()
    assert all(torch.equal(full[k], expected[k]) for k in expected)
    vision = ours("vision")
    assert not all(torch.equal(vision[k], expected[k]) for k in expected)
