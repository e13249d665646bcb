"""Top-1 accuracy of an encoder + head on each task's split."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from tintcli.io import StateDict, encoder_entries
from tintcli.runtime import Runtime


@torch.inference_mode()
def accuracy(encoder: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             runtime: Runtime) -> float:
    """Top-1 accuracy on uint8 ``images``: batches stream in while the device computes, and
    the correct count stays on the device (one host sync per task, not per batch)."""
    head = head.to(runtime.device).eval()
    encoder.eval()
    labels = labels.to(runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    start = 0
    for inputs in runtime.batches(images):
        with runtime.autocast():
            logits = head(encoder(inputs))
        correct += (logits.argmax(-1) == labels[start: start + len(inputs)]).sum()
        start += len(inputs)
    return correct.item() / max(len(labels), 1)


def evaluate_state(encoder: nn.Module, state: StateDict, heads: Mapping[str, nn.Module],
                   data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   runtime: Runtime) -> dict[str, float]:
    """Load ``state`` into ``encoder`` and score it on every task with that task's head."""
    return evaluate_tasks(encoder, lambda task: state, heads, data, runtime)


def evaluate_tasks(encoder: nn.Module, state_for: Callable[[str], StateDict] | None,
                   heads: Mapping[str, nn.Module],
                   data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   runtime: Runtime) -> dict[str, float]:
    """Score each task with its own encoder state (a tinted encoder differs per task; None:
    the encoder as it is). ``data``: task -> (uint8 images, labels)."""
    out, loaded = {}, None
    for task in data:
        state = state_for(task) if state_for is not None else None
        if state is not None and state is not loaded:
            encoder.load_state_dict(encoder_entries(state))
            loaded = state
        out[task] = accuracy(encoder, heads[task], *data[task], runtime)
    return out


def summarize(acc: Mapping[str, float], expert_acc: Mapping[str, float]) -> dict:
    """Average accuracy and normalised accuracy (merged / the task's own expert).

    A task whose expert scores 0 has no normalised accuracy (None); the normalised average
    is taken over the tasks that have one.
    """
    normalized = {t: acc[t] / expert_acc[t] if expert_acc[t] > 0 else None for t in acc}
    defined = [v for v in normalized.values() if v is not None]
    return {
        "accuracy": dict(acc),
        "average": sum(acc.values()) / len(acc),
        "normalized": normalized,
        "normalized_average": sum(defined) / len(defined) if defined else None,
    }
