"""Top-1 accuracy of an encoder + head on each task's test split."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from tintcli.io import StateDict, encoder_entries


@torch.inference_mode()
def accuracy(encoder: nn.Module, head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             device: torch.device, batch_size: int = 512) -> float:
    head = head.to(device).eval()
    correct = 0
    encoder.eval()
    for i in range(0, len(inputs), batch_size):
        logits = head(encoder(inputs[i : i + batch_size].to(device)))
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / max(len(labels), 1)


def evaluate_state(encoder: nn.Module, state: StateDict, heads: Mapping[str, nn.Module],
                   test_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device) -> dict[str, float]:
    """Load ``state`` into ``encoder`` and score it on every task with that task's head."""
    return evaluate_tasks(encoder, lambda task: state, heads, test_sets, device)


def evaluate_tasks(encoder: nn.Module, state_for: Callable[[str], StateDict],
                   heads: Mapping[str, nn.Module],
                   test_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device) -> dict[str, float]:
    """Score each task with its own encoder state (a tinted encoder differs per task)."""
    out, loaded = {}, None
    for task in test_sets:
        state = state_for(task)
        if state is not loaded:
            encoder.load_state_dict(encoder_entries(state))
            loaded = state
        out[task] = accuracy(encoder, heads[task], *test_sets[task], device)
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
