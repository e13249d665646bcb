"""Test-time adaptive merging: one file per method (``adamerging.py``, ``tinting.py`` with
SyMerge, ``surgery.py`` with ProbSurgery, ``wemoe.py``, ``lot.py``: trainers and closed forms,
registered as methods) and what they share.

An adaptive method learns merging coefficients (and, for Tinting, one task-specific layer per
task) on unlabeled test images. The pieces here are method-agnostic:

- ``AdaptationContext`` (run.py): the adaptation images, heads and device of one run, plus
  the experts' outputs on those images, computed once and reused (they never change during
  adaptation);
- ``LambdaMerger`` (merger.py): theta(lambda) built on the device from stacked task vectors;
- ``SAMPLERS`` (samplers.py): which pseudo-labelled samples a step learns from;
- ``AdaptationRun`` (run.py): the base of every trainer, its steps checkpointed;
- ``Merged`` (``tintcli/merged.py``): what every method returns, and what tint scores and
  saves (``heads``: each task's head, tinted or zero-shot; ``tints``: the encoder entries a
  task overrides; ``tinted``: what was tinted);
- ``Checkpoint`` (checkpoints.py): a run's state on disk, so that a stopped run resumes.

The trainers register themselves when ``tintcli.methods`` discovers this package's modules
(``get_method``, ``registered``): importing this package alone does not import them.
"""

from tintcli.adaptation.checkpoints import Checkpoint
from tintcli.adaptation.merger import LambdaMerger
from tintcli.adaptation.run import (
    AdaptationContext,
    AdaptationRun,
    BatchStream,
    EpochRun,
    StepCallback,
    check_common,
    read_losses,
)
from tintcli.adaptation.samplers import SAMPLERS, pseudo_label_loss

__all__ = ["AdaptationContext", "AdaptationRun", "BatchStream", "Checkpoint", "EpochRun",
           "LambdaMerger", "SAMPLERS", "StepCallback", "check_common",
           "pseudo_label_loss", "read_losses"]
