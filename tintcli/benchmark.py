"""Is the built-in benchmark realistic? The targets that make merging results meaningful.

A benchmark where merging does not interfere is useless, so tint measures, on every zoo,
the phenomena of the real ViT-B/32 eight-task benchmark (48 / 90.5 / 69.1 for zero-shot /
experts / task arithmetic): modest zero-shot, strong experts, and task arithmetic well
between the two. Tune the benchmark to meet them, never the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tintcli.cache import ensure_json
from tintcli.io import StateDict, fingerprint
from tintcli.merging import task_arithmetic_merge
from tintcli.zoo import Zoo

SWEEP = [round(0.1 * i, 1) for i in range(1, 11)]
REALISM_VERSION = 3  # bump when the checks change, so cached verdicts are redone


Score = Callable[[StateDict, str], Mapping[str, float]]  # (state, split) -> task accuracies


def realism(zoo: Zoo, tasks: list[str], pretrained: StateDict,
            experts: Mapping[str, StateDict], score: Score,
            validation_digests: Mapping[str, str], measured_on: Mapping[str, str]) -> dict:
    """Zero-shot, experts and a 0.1-step task-arithmetic sweep against the targets, the best
    lambda chosen on validation (never on test); cached (``tintcli/cache.py``) by the digests
    of every checkpoint and split it measures and where it measures them (``measured_on``:
    device type, precision, torch)."""
    key = {"version": REALISM_VERSION, "sweep": SWEEP, "tasks": tasks,
           "checkpoints": zoo.checkpoint_hashes(), "test_data": zoo.data_digests(),
           "validation_data": dict(validation_digests), "measured_on": dict(measured_on),
           "accuracies": {t: [zoo.entries[t].zeroshot_accuracy, zoo.entries[t].expert_accuracy]
                          for t in tasks}}
    return ensure_json(zoo.root / "realism" / fingerprint(key), key,
                       lambda: _measure(zoo, tasks, pretrained, experts, score),
                       "the benchmark's realism verdict")


def _measure(zoo: Zoo, tasks: list[str], pretrained: StateDict,
             experts: Mapping[str, StateDict], score: Score) -> dict:
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    zeroshot = mean([zoo.entries[t].zeroshot_accuracy for t in tasks])
    experts_avg = mean([zoo.entries[t].expert_accuracy for t in tasks])
    worst_expert = min(zoo.entries[t].expert_accuracy for t in tasks)
    below = [t for t in tasks
             if zoo.entries[t].expert_accuracy <= zoo.entries[t].zeroshot_accuracy]
    sweep, on_validation = {}, {}
    for lam in SWEEP:
        merged = task_arithmetic_merge(pretrained, experts, lam)
        on_validation[f"{lam:.1f}"] = mean(list(score(merged, "val").values()))
        sweep[f"{lam:.1f}"] = mean(list(score(merged, "test").values()))
    # chosen on validation; JSON keys are strings, so they are from the start
    best_lam = max(on_validation, key=on_validation.get)
    best = sweep[best_lam]  # its test accuracy
    checks = [
        {"what": f"zero-shot avg {100 * zeroshot:.1f} ≤ 60", "ok": zeroshot <= 0.60},
        {"what": f"worst expert {100 * worst_expert:.1f} ≥ 90", "ok": worst_expert >= 0.90},
        {"what": "every expert above zero-shot on its task"
                 + (f" (not: {', '.join(below)})" if below else ""), "ok": not below},
        {"what": f"task arithmetic at the best λ on validation ({best_lam}) {100 * best:.1f}: "
                 f"{100 * (experts_avg - best):.1f} below experts",
         "ok": best <= experts_avg - 0.10},
        {"what": f"{100 * (best - zeroshot):.1f} above zero-shot", "ok": best >= zeroshot + 0.10},
    ]
    return {"zeroshot_average": zeroshot, "experts_average": experts_avg,
            "worst_expert": worst_expert, "task_arithmetic_sweep": sweep,
            "task_arithmetic_sweep_validation": on_validation,
            "best_lambda": best_lam, "best_lambda_chosen_on": "val", "checks": checks,
            "all_met": all(c["ok"] for c in checks)}
