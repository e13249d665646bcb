"""PCB-Merging (Du et al., 2024, "Parameter Competition Balancing for Model Merging").

Reference: duguodong7/pcb-merging, https://github.com/duguodong7/pcb-merging — the ViT
script ``vision_source_code/pcb.py`` (its ``__main__``: ``clamp``, ``normalize``,
``att_ratio = 0.05``, ``lams = 1.2``); ``vision_source_code/pcb_ES.py`` and the top-level
``pcb-merging.py`` name the ratio ``pcb_ratio`` (used here) and differ in the competition
term (see below).

Per task t, over its whole flattened task vector (all float entries of the model together):
1. clip: |tau_t| clamped to its order statistics at positions int(d * min_ratio) and
   int(d * (1 - max_ratio) - 1) of the ascending sort (d entries), i.e. about its 1 % and
   99 % quantiles; tau~_t = sign(tau_t) * clipped. Small magnitudes are *raised* to the
   lower bound too (sign(0) = 0 keeps zeros zero in tau~_t, but not in n_t);
2. n_t = min-max normalisation of the clipped magnitudes: (clip - low) / (high - low);
3. balancing beta_t = exp(T * n_t^2) * tanh(tau_t * sum_j sign(tau_j) * n_j); note tau_t is
   the *raw* task vector in ``pcb.py`` (the paper writes the clipped one);
4. weights: beta_t clamped below at its order statistic int(d * (1 - pcb_ratio)) (about the
   top ``pcb_ratio`` survive) and min-max normalised: w_t = (clamp(beta_t, thr) - thr) /
   (max beta_t - thr); entries equal to the threshold get weight 0;
5. theta = theta_0 + sum_t w_t * (lam * tau~_t) / max(sum_t w_t, 1e-12).

The order statistics are per task over the whole flattened model (the reference's
``torch.sort(x, dim=1)`` of the (T, d) matrix), so this module finds each one with
``torch.kthvalue`` on one task's flattened vector at a time (``torch.quantile`` refuses
inputs over 16M entries). Where the reference divides 0 by 0 (a task whose clipped
magnitudes are all equal, e.g. a zero task vector, or whose largest beta equals its
threshold) it gives NaN everywhere; here that normalisation is 0, so such a task gets weight
0 and the others merge as with it present (T in exp(T n^2) still counts it).

Which tensors: every floating-point entry, whatever its shape (1-D norms and biases, the 4-D
patch embedding, the head, the ``text.*`` extras): the reference flattens the whole
state dict, so the extras' zero task vectors count in d (they shift the quantile positions)
and, having weight 0, stay theta_0. Integer buffers are copied from theta_0.

Memory: the reference holds the (T, d) task-vector matrix and several (T, d) intermediates
plus sorts of them; this streams, one tensor at a time with its T slices stacked (in slices
of at most ``consensus.CHUNK`` entries), in four passes: (a) clip bounds per task, (b) the
competition sum S = sum_j sign(tau_j) n_j (one model-sized fp32 tensor), (c) beta's
threshold and maximum per task, (d) the merge. Peak extra memory is S plus one task's
flattened vector (and kthvalue's copy of it) plus a few (T, slice) temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from tintcli.checks import number
from tintcli.errors import TintError
from tintcli.io import StateDict
from tintcli.merging.task_vectors import mergeable, merged_in_chunks, stacked_chunks
from tintcli.methods import register


def check_pcb(params: Mapping[str, object], encoder=None, tasks=None) -> None:
    number(params, "pcb_ratio", 0, 1, must="a fraction in (0, 1]")
    if params.get("pcb_ratio") == 0:
        raise ValueError("pcb_ratio=0 must be a fraction in (0, 1]")
    for key in ("min_ratio", "max_ratio"):
        number(params, key, 0, 0.49, must="a fraction in [0, 0.49] (a clip quantile)")
    number(params, "lam")


def _normalised(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(x - low) / (high - low) for x clamped to [low, high]; where high == low, x == low and
    this gives 0 (the reference's 0 / 0 = NaN)."""
    span = high - low
    return (x - low).div_(torch.where(span > 0, span, 1))


def _flat(tensors: Iterator[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
    """Write one task's pieces, flattened, into ``buffer`` (reused across tasks)."""
    offset = 0
    for piece in tensors:
        buffer[offset:offset + piece.numel()] = piece.flatten()
        offset += piece.numel()
    return buffer


def _kth(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ascending sort's x[index] (0-based), without sorting."""
    return x.kthvalue(index + 1).values


def _clip(taus: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped magnitudes and their min-max normalisation n."""
    clipped = taus.abs().clamp_(low, high)
    return clipped, _normalised(clipped, low, high)


def _balancing(taus: torch.Tensor, normalised: torch.Tensor, competition: torch.Tensor,
               n_tasks: int) -> torch.Tensor:
    """beta = exp(T n^2) * tanh(tau * S): large where the task's own entry is large and
    agrees with the other tasks' (normalised, signed) entries."""
    intra = normalised.square().mul_(n_tasks).exp_()
    return intra.mul_((taus * competition).tanh_())


def _task_balancing(tau: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                    competition: torch.Tensor, n_tasks: int) -> torch.Tensor:
    return _balancing(tau, _clip(tau, low, high)[1], competition, n_tasks)


@register("pcb", check=check_pcb, pretty="PCB-Merging", paper="https://arxiv.org/abs/2410.02396",
          code="https://github.com/duguodong7/pcb-merging")
def pcb_merge(pretrained: Mapping[str, torch.Tensor],
              experts: Mapping[str, Mapping[str, torch.Tensor]], pcb_ratio: float = 0.05,
              lam: float = 1.2, min_ratio: float = 0.01, max_ratio: float = 0.01) -> StateDict:
    """PCB-Merging with the ViT script's defaults: keep the top 5 % of each task's balancing
    scores, clip at the 1 % / 99 % magnitude quantiles, scale the task vectors by 1.2 (one
    lam for all tasks, as ``pcb.py``; ``pcb_ES.py`` searches one per task in [0.8, 1.3])."""
    check_pcb({"pcb_ratio": pcb_ratio, "lam": lam, "min_ratio": min_ratio,
               "max_ratio": max_ratio})
    if not experts:
        raise TintError("PCB-Merging needs at least one expert")
    models = list(experts.values())
    n_tasks = len(models)
    keys = [k for k, v in pretrained.items() if mergeable(v)]
    d = sum(pretrained[k].numel() for k in keys)
    if d == 0:
        return {k: v.clone() for k, v in pretrained.items()}

    def tau(key: str, t: int) -> torch.Tensor:  # one task's tau of one entry, as (1, n)
        return (models[t][key].float() - pretrained[key].float()).reshape(1, -1)

    buffer = torch.empty(d, dtype=torch.float32, device=pretrained[keys[0]].device)

    # (a) clip bounds of |tau_t|, per task over the whole model
    low_index, high_index = int(d * min_ratio), int(d * (1 - max_ratio) - 1)
    lows, highs = [], []
    for t in range(n_tasks):
        magnitudes = _flat((tau(k, t).abs() for k in keys), buffer)
        lows.append(_kth(magnitudes, low_index))
        highs.append(_kth(magnitudes, high_index))

    # (b) the competition sum S = sum_j sign(tau_j) * n_j, per entry
    low, high = torch.stack(lows)[:, None], torch.stack(highs)[:, None]  # (T, 1)
    competition: StateDict = {}  # flattened
    for key in keys:
        competition[key] = torch.empty(pretrained[key].numel(), device=buffer.device,
                                       dtype=torch.float32)
        for part, theta0, thetas in stacked_chunks(pretrained, experts, key):
            taus = thetas - theta0
            competition[key][part] = (torch.sign(taus) * _clip(taus, low, high)[1]).sum(0)

    # (c) per task, beta's threshold (its lower clamp) and maximum over the whole model
    threshold_index = int(d * (1 - pcb_ratio))
    thresholds, maxima = [], []
    for t in range(n_tasks):
        betas = (_task_balancing(tau(k, t), lows[t], highs[t], competition[k], n_tasks)
                 for k in keys)
        flat = _flat(betas, buffer)
        thresholds.append(_kth(flat, threshold_index))
        maxima.append(flat.max())

    # (d) the merge
    threshold, maximum = torch.stack(thresholds)[:, None], torch.stack(maxima)[:, None]
    out: StateDict = {}
    for key, value in pretrained.items():
        if key not in competition:
            out[key] = value.clone()
            continue
        def combine(part: slice, theta0: torch.Tensor, thetas: torch.Tensor,
                    key: str = key) -> torch.Tensor:
            taus = thetas - theta0
            clipped, normalised = _clip(taus, low, high)
            beta = _balancing(taus, normalised, competition[key][part], n_tasks)
            weights = _normalised(beta.clamp_(min=threshold), threshold, maximum)
            scaled = clipped.mul_(torch.sign(taus)).mul_(lam)  # sign(tau) * clipped * lam
            return theta0 + scaled.mul_(weights).sum(0) / weights.sum(0).clamp(min=1e-12)

        out[key] = merged_in_chunks(pretrained, experts, key, combine)
    return out
