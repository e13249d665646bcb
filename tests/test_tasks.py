"""The procedural tasks: deterministic, balanced, cached with Hugging Face datasets."""

import pytest
import torch
from omegaconf import OmegaConf

from tintcli.errors import TintError
from tintcli.tasks import task_names
from tintcli.tasks.generated import load_synthetic
from tintcli.tasks.synthetic import SYNTH_FAMILIES, generate


@pytest.mark.parametrize("family", list(SYNTH_FAMILIES))
def test_generation_is_seeded_balanced_and_varied(family):
    images, labels = generate(family, 2 * SYNTH_FAMILIES[family].num_classes, 32, seed=3)
    again, _ = generate(family, 2 * SYNTH_FAMILIES[family].num_classes, 32, seed=3)
    other, _ = generate(family, 2 * SYNTH_FAMILIES[family].num_classes, 32, seed=4)
    assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
    assert torch.equal(images, again)
    assert not torch.equal(images, other)
    assert torch.bincount(labels).tolist() == [2] * SYNTH_FAMILIES[family].num_classes
    assert images.float().std() > 10  # not blank


def test_splits_are_cached_on_disk_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TINT_CACHE", str(tmp_path))
    first = load_synthetic("digits", "test", 20, 32, 0)
    stored = [p for p in (tmp_path / "data" / "synthetic").iterdir() if p.is_dir()]
    assert len(stored) == 1 and (stored[0] / "dataset_info.json").exists()
    assert not list(stored[0].parent.glob("*.tmp"))  # no temporary folder left behind
    second = load_synthetic("digits", "test", 20, 32, 0)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, load_synthetic("digits", "train", 20, 32, 0).images)


def test_unknown_task_is_named_with_the_alternatives():
    cfg = OmegaConf.create({"name": "mine", "source": "synthetic", "names": ["digits", "mnist"]})
    with pytest.raises(TintError, match="unknown task 'mnist' in tasks 'mine'") as err:
        task_names(cfg)
    assert "digits" in str(err.value).splitlines()[1]
