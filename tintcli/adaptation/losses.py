"""SyMerge's adaptation losses (``losstype`` in the authors' ``src/main_symerge.py``), by the
names its final paper uses, for the Tinting trainer (``method.loss``):

- ``crosspseudo``: cross-entropy to the expert's argmax on every sample (Model Tinting);
- ``crosspseudoconf``: the same on the samples the confidence sampler keeps (Model
  Tinting++, SyMerge's default);
- ``selfentropy``: the mean Shannon entropy of the merged model's predictions (AdaMerging's);
- ``l1feature``: L1 between the merged encoder's features and the expert encoder's on the
  same images (Surgery's; a tinted head gets no gradient from it);
- ``crossgt``: cross-entropy to the true labels. An oracle, never a result: only behind
  ``oracle=true``, and every table labels its row so.

Each is a plain function of the merged model's logits and features and of the batch's
targets (what ``TARGETS`` says the loss learns from), returning (loss, samples that counted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tintcli.adaptation.samplers import keep_all, keep_confident, pseudo_label_loss

# (logits, features, targets) -> (loss, samples that counted: an int, or a count on the device)
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
               tuple[torch.Tensor, int | torch.Tensor]]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax predictions over the batch."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def crosspseudo(logits, features, expert_logits):
    return pseudo_label_loss(logits.float(), expert_logits, keep_all)


def crosspseudoconf(logits, features, expert_logits):
    return pseudo_label_loss(logits.float(), expert_logits, keep_confident)


def selfentropy(logits, features, _):
    return entropy(logits), len(logits)


def l1feature(logits, features, expert_features):
    return F.l1_loss(features.float(), expert_features), len(features)


def crossgt(logits, features, labels):
    return F.cross_entropy(logits.float(), labels), len(labels)


LOSSES: dict[str, Loss] = {"crosspseudo": crosspseudo, "crosspseudoconf": crosspseudoconf,
                           "selfentropy": selfentropy, "l1feature": l1feature,
                           "crossgt": crossgt}
# what each loss learns from: the experts' logits or features on the images, the true labels,
# or nothing but the merged model's own predictions
TARGETS = {"crosspseudo": "logits", "crosspseudoconf": "logits", "selfentropy": None,
           "l1feature": "features", "crossgt": "labels"}
ORACLES = ("crossgt",)
