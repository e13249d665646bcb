"""Real task sets, offline: tiny datasets laid out as the hub lays them out (a save_to_disk
DatasetDict, and parquet files under data/), made with the real `datasets` library and read
through the real vit8 task YAMLs, end to end through `tint merge +tasks=vit8` over a tiny
task_vectors release whose folders carry the release's own names (MNIST, GTSRB, EuroSAT).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from test_pools import make_hf_pool, make_release

from tintcli.runtime import Runtime
from tintcli.tasks import load_split

datasets = pytest.importorskip("datasets")
pytest.importorskip("open_clip")

# tint task -> (the synthetic family drawing its images, the layout of its local copy)
TASKS = {"eurosat": ("landuse", "disk"), "gtsrb": ("signs", "parquet"),
         "mnist": ("digits", "disk")}
RELEASE = {"eurosat": "EuroSAT", "gtsrb": "GTSRB", "mnist": "MNIST"}  # conf/task checkpoints
SIZES = {"train": 60, "test": 40}
CLIP_TINY = ["encoder=clip_vit_b32", "encoder.num_classes=16", "encoder.image_size=32",
             "encoder.timm_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, "
             "num_heads: 2}", "tasks.workers=0"]


def _vit8(root, names=tuple(TASKS), plus=True):
    """The real vit8 task set, on some of its tasks, read from local copies under ``root``
    (``+tasks=`` as users type it; Hydra's compose API takes the plain form)."""
    return [f"{'+' if plus else ''}tasks=vit8", f"tasks.names=[{','.join(names)}]",
            f"tasks.data_root={root}"]


def _split(family, split, seed):
    """Hub-like rows: PNG-encoded images of 40 x 36 (not square: resize and crop do work)."""
    from PIL import Image

    from tintcli.tasks.synthetic import generate

    images, labels = generate(family, SIZES[split], 40, seed)
    pictures = [Image.fromarray(x[:36].numpy()) for x in images]  # 40 wide, 36 high
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(num_classes=10 if family != "signs"
                                                               else 43)})
    return datasets.Dataset.from_dict({"image": pictures, "label": labels.tolist()},
                                      features=features)


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, tiny_cache):
    """Offline Hugging Face settings and a private datasets cache for this module."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
                                            "HF_DATASETS_CACHE")}
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf-datasets"))})
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, hub_env):
    root = tmp_path_factory.mktemp("datasets")
    for i, (task, (family, layout)) in enumerate(TASKS.items()):
        splits = {s: _split(family, s, seed=10 * i + j) for j, s in enumerate(SIZES)}
        if layout == "disk":
            datasets.DatasetDict(splits).save_to_disk(str(root / task))
        else:  # the hub's own parquet layout
            (root / task / "data").mkdir(parents=True)
            for name, split in splits.items():
                split.to_parquet(str(root / task / "data" / f"{name}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory, data_root):
    """A tiny task_vectors release named as the real one (EuroSAT/, GTSRB/, MNIST/), its heads
    the class means of each expert's features on the task's cached test pixels."""
    cfg = compose_config(overrides=[*CLIP_TINY, *_vit8(data_root, plus=False)], tiny=False)
    runtime = Runtime.create(torch.device("cpu"), cfg.encoder, "fp32")

    def test_images(task):
        test = load_split(cfg.tasks, cfg.encoder, task, "test")
        return runtime.inputs(test.images), test.labels, test.num_classes

    return make_release(tmp_path_factory.mktemp("release"), RELEASE, test_images)


def _pixel_entries(cache):
    return {p.name: json.loads((p / "manifest.json").read_text())["built_at"]
            for p in (cache / "pixels").iterdir() if (p / "manifest.json").is_file()}


def test_vit8_end_to_end_pixel_cache_built_once_validation_stable(tint_here, tmp_path, data_root,
                                                                  release, tiny_cache):
    args = [*_vit8(data_root), *CLIP_TINY, "pool=task_vectors", f"pool.path={release}",
            "method=data_free", "eval.validation=true"]
    first = tint_here("merge", *args, f"hydra.run.dir={tmp_path / 'one'}")
    assert first.returncode == 0, first.stderr
    built = _pixel_entries(tiny_cache)
    second = tint_here("merge", *args, f"hydra.run.dir={tmp_path / 'two'}")
    assert second.returncode == 0, second.stderr
    assert _pixel_entries(tiny_cache) == built  # every split reused, none rebuilt
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert one["task_set"]["name"] == "vit8" and one["tasks"] == list(TASKS)
    assert one["splits"]["chosen_on"] == "val" and one["precision"] == "fp32"
    for task in TASKS:  # provenance: where each split came from, and the same val twice
        test, val = one["data"]["test"][task], one["data"]["val"][task]
        assert test["dataset"] == str(data_root / task) and test["fingerprint"]
        assert test["count"] == SIZES["test"] and val["count"] == SIZES["train"] // 10
        assert val["carved"] == {"from": "train", "fraction": 0.1, "seed": 0, "take": "val"}
        assert two["data"]["val"][task]["digest"] == val["digest"]
    rows = {r["name"]: r for r in one["rows"]}
    assert set(rows["experts"]["accuracy"]) == set(TASKS)
    assert all("validation" in r for r in one["rows"] if r["kind"] == "merged")
    assert rows["experts"]["average"] > rows["zero-shot"]["average"]


def test_adaptive_methods_learn_from_the_pixel_cache(tint_here, tmp_path, data_root, release):
    out = tint_here("merge", *_vit8(data_root), *CLIP_TINY, "pool=task_vectors",
                   f"pool.path={release}", "method=tinting_pp", "method.epochs=2",
                   "vectors_dtype=bf16", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "results.json").read_text())["rows"][-1]
    assert row["method"] == "tinting" and len(row["adaptation"]["loss_curve"]["loss"]) == 2


def test_pixels_are_clips_transform_of_the_decoded_images(data_root, hub_env, tiny_cache):
    """Both layouts give, per row, torchvision's Resize(32, bicubic) + CenterCrop(32) of the
    decoded image, and the labels of the label column."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    cfg = compose_config(overrides=[*CLIP_TINY, *_vit8(data_root, plus=False)], tiny=False)
    def clip(image):
        resized = Resize(32, InterpolationMode.BICUBIC)(image.convert("RGB"))
        return torch.from_numpy(np.array(CenterCrop(32)(resized)))

    for task in ("gtsrb", "mnist"):  # parquet, save_to_disk
        split = load_split(cfg.tasks, cfg.encoder, task, "test")
        if TASKS[task][1] == "disk":
            raw = datasets.load_from_disk(str(data_root / task))["test"]
        else:
            raw = datasets.load_dataset("parquet", split="test", data_files={"test": str(
                data_root / task / "data" / "test-00000-of-00001.parquet")})
        assert split.images.shape == (SIZES["test"], 32, 32, 3)
        assert torch.equal(split.labels, torch.tensor(raw["label"]))
        for i in (0, 7, SIZES["test"] - 1):
            assert torch.equal(split.images[i], clip(raw[i]["image"]))


def test_validation_is_fusionbench_carve_of_train(data_root, hub_env, tiny_cache):
    """val = the last int(0.1 N) rows of torch's random_split over train, seed 0 (FusionBench's
    train_validation_split), in that order."""
    cfg = compose_config(overrides=[*CLIP_TINY, *_vit8(data_root, plus=False)], tiny=False)
    val = load_split(cfg.tasks, cfg.encoder, "mnist", "val")
    held = int(SIZES["train"] * 0.1)
    _, reference = torch.utils.data.random_split(
        range(SIZES["train"]), [SIZES["train"] - held, held],
        generator=torch.Generator().manual_seed(0))
    train = datasets.load_from_disk(str(data_root / "mnist"))["train"]
    assert val.labels.tolist() == [train[i]["label"] for i in reference.indices]
    whole = load_split(cfg.tasks, cfg.encoder, "mnist", "train")  # train minus validation
    assert len(whole) == SIZES["train"] - held
    assert not set(map(bytes, whole.images.numpy())) & set(map(bytes, val.images.numpy()))


def test_missing_dataset_offline_names_the_hub_id_and_the_fix(run_tint, tmp_path, release,
                                                             hub_env):
    out = run_tint("merge", "+tasks=vit8", "tasks.names=[mnist]", *CLIP_TINY,
                   "pool=task_vectors", f"pool.path={release}")
    assert out.returncode == 2
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("error: cannot load dataset 'ylecun/mnist'") and "'test'" in first
    assert "tasks.data.mnist.path=" in out.stderr and "tasks.data_root=" in out.stderr
    assert "Traceback" not in out.stderr


def test_task_set_the_pool_does_not_cover_fails_naming_the_difference(tint_here, data_root,
                                                                      release):
    out = tint_here("merge", *_vit8(data_root, ("mnist", "dtd", "svhn")), *CLIP_TINY,
                   "pool=task_vectors", f"pool.path={release}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == ("error: the task set and the task_vectors pool do not cover the same "
                        f"tasks: no expert for dtd, svhn ({release / 'DTD' / 'finetuned.pt'} "
                        "and 1 more does not exist)")
    assert "The pool has: EuroSAT, GTSRB, MNIST." in out.stderr


def test_plus_tasks_form_and_plain_form_compose_the_same(tint_here):
    plus = tint_here("merge", "+tasks=vit8", "--cfg", "job")
    plain = tint_here("merge", "tasks=vit8", "--cfg", "job")
    default = tint_here("merge", "--cfg", "job")
    assert plus.returncode == 0, plus.stderr
    assert plus.stdout == plain.stdout and "name: vit8" in plus.stdout
    assert "hub: tanganke/sun397" in plus.stdout and "name: synth8" in default.stdout


def test_only_groups_already_in_the_defaults_lose_their_plus():
    from tintcli.cli import normalize_overrides

    assert normalize_overrides(["+tasks=vit8", "+encoder=clip_vit_b32", "+experiment=synth8_table",
                                "+foo.bar=1", "++tasks.seed=3", "seed=1"], "merge") == \
        ["tasks=vit8", "encoder=clip_vit_b32", "+experiment=synth8_table", "+foo.bar=1",
         "++tasks.seed=3", "seed=1"]


def test_two_runs_starting_at_once_build_a_split_once(data_root, hub_env, tmp_path):
    """Both get the one entry the first built (the second waits on the lock and reuses it)."""
    import subprocess

    script = (  # counts the cache entries this process builds itself
        "import sys\n"
        "import tintcli.cache as cache\n"
        "from conftest import compose_config\n"
        "from tintcli.tasks import load_split\n"
        "build = cache._build_into\n"
        "cache._build_into = lambda *a: print('BUILT', flush=True) or build(*a)\n"
        "cfg = compose_config(overrides=sys.argv[1:], tiny=False)\n"
        "print(load_split(cfg.tasks, cfg.encoder, 'eurosat', 'test').digest)\n")
    env = {**os.environ, "TINT_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).parent)}
    args = [*CLIP_TINY, *_vit8(data_root, plus=False)]
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    entries = [p for p in (tmp_path / "cache" / "pixels").iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].name.startswith("eurosat-test-")
    assert not list((tmp_path / "cache" / "pixels").glob(".*.tmp"))
    assert sum(out.count("BUILT") for out, _ in outs) == 1
    assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1]  # the same pixels


def test_hf_pool_takes_checkpoint_names_and_head_prompts_from_the_task_yamls(tiny_cache,
                                                                            tmp_path):
    """FusionBench names Stanford Cars' expert `..._stanford-cars`; its head is the base
    model's text tower over conf/task/stanford_cars.yaml's class names and templates."""
    import transformers

    from tintcli.encoders import build_encoder
    from tintcli.heads import text_tower_head
    from tintcli.pools import open_pool

    hf_pool = make_hf_pool(tmp_path / "hf")
    for task, twin in (("stanford-cars", "signs"), ("mnist", "digits")):
        (tmp_path / f"clip_{task}").symlink_to(hf_pool / f"clip_{twin}")
    cfg = compose_config(overrides=[*CLIP_TINY, "tasks=vit8", "tasks.names=[stanford_cars,mnist]",
                                    "pool=hf", f"pool.base={hf_pool / 'base'}",
                                    f"pool.experts='{tmp_path}/clip_{{task}}'"], tiny=False)
    pool = open_pool(cfg.pool, ["stanford_cars", "mnist"], build_encoder(cfg.encoder), "clip",
                     cfg.tasks)
    assert pool.expert_files["stanford_cars"].parent == tmp_path / "clip_stanford-cars"
    model = transformers.CLIPModel.from_pretrained(hf_pool / "base").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_pool / "base")
    for task in ("mnist",):  # (Cars' prompts are longer than the tiny text tower's context)
        spec = cfg.tasks.data[task]
        expected = text_tower_head(model, tokenizer, list(spec.classnames), list(spec.templates))
        head = pool.head(task)
        assert head.weight.shape[0] == len(spec.classnames)
        assert torch.allclose(head.weight, expected.weight, atol=1e-6)
