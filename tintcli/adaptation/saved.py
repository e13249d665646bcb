"""An adapted model on disk (``adapted/<method>/`` in a run directory), and back.

``merged.safetensors`` holds the merged encoder at the learned lambda; ``lambdas.safetensors``
the lambdas with their layer and task names; ``tints.safetensors`` each task's tinted entries
(``<task>.<key>``: the head's weight and bias, Surgery's adapter with its head, or the tinted
encoder module's). Loading gives
an ``Merged`` that scores exactly as the one that was saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from safetensors import safe_open
from torch import nn

from tintcli.errors import TintError
from tintcli.heads import ZeroShotHead
from tintcli.io import StateDict, load_state_dict, save_state_dict
from tintcli.merged import Merged
from tintcli.methods import outcomes
from tintcli.plots import lambda_heatmap

MERGED, LAMBDAS, TINTS, HEATMAP = ("merged.safetensors", "lambdas.safetensors",
                                   "tints.safetensors", "lambdas.png")


def head_kinds() -> dict[str, Callable[[StateDict], nn.Module]]:
    """What was tinted -> how a task's saved head is rebuilt: Model Tinting's tinted zero-shot
    heads, and each method's own (``register(outcome=...)``: Surgery's adapters)."""
    return {"head": ZeroShotHead.from_state_dict,
            **{kind: o.head for kind, o in outcomes().items() if o.head is not None}}


def save_adapted(adapted: Merged, folder: Path, label: str,
                 merged: bool = True) -> dict[str, str]:
    """The learned lambdas, the tinted layers, the lambda heatmap and, with ``merged`` (a run's
    ``save_merged=true``: an L/14 encoder is 1.2 GB per method and trial), the merged encoder."""
    meta = {"method": label, "tasks": json.dumps(adapted.tasks)}
    files = {"lambdas": folder / LAMBDAS, "heatmap": folder / HEATMAP}
    if merged:
        files["merged"] = folder / MERGED
        save_state_dict(adapted.state, files["merged"], meta)
    save_state_dict({"lambdas": adapted.lambdas}, files["lambdas"],
                    {**meta, "layers": json.dumps(adapted.layer_names),
                     "method_name": adapted.method})
    if adapted.model is not None:  # a routed model (WEMoE's routers; the rest is the pool's)
        files["tints"] = folder / TINTS
        tensors, extra = outcomes()[adapted.tinted].save(adapted.model)
        save_state_dict(tensors, files["tints"], {**meta, **extra, "tinted": adapted.tinted})
    elif adapted.tinted is not None:
        per_task = ({t: head.state_dict() for t, head in adapted.heads.items()}
                    if adapted.tinted in head_kinds() else adapted.tints)
        tints = {f"{t}.{k}": v for t, entries in per_task.items() for k, v in entries.items()}
        files["tints"] = folder / TINTS
        save_state_dict(tints, files["tints"], {**meta, "tinted": adapted.tinted})
    lambda_heatmap(adapted.lambdas, adapted.layer_names, adapted.tasks, f"{label}: learned λ",
                   files["heatmap"])
    return {k: str(v) for k, v in files.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_adapted(folder: Path, heads: Mapping[str, nn.Module],
                 pool: tuple[nn.Module, StateDict, Mapping[str, StateDict]] | None = None
                 ) -> Merged:
    """What ``save_adapted`` wrote; ``heads`` are the zero-shot heads for untinted tasks.
    ``pool``: (encoder, pretrained, experts), which a routed model (WEMoE) is rebuilt from
    around its saved routers."""
    folder = Path(folder)
    meta = _metadata(folder / LAMBDAS)
    tasks = json.loads(meta["tasks"])
    out_heads, tints, tinted = {t: heads[t] for t in tasks}, {}, None
    if (folder / TINTS).is_file():
        tints_meta = _metadata(folder / TINTS)
        tinted = tints_meta["tinted"]
        saved = load_state_dict(folder / TINTS, f"the tints in {folder}")
        outcome = outcomes().get(tinted)
        if outcome is not None and outcome.load is not None:  # a routed model (WEMoE's)
            if pool is None:
                raise TintError(f"{folder} holds a routed model ({tinted}): pass the pool it "
                                "routes (encoder, pretrained, experts) to rebuild it")
            lambdas = load_state_dict(folder / LAMBDAS, f"the lambdas in {folder}")["lambdas"]
            model, start = outcome.load(*pool, tasks, saved, tints_meta)
            return Merged(meta.get("method_name", "adapted"), start, out_heads, {}, lambdas,
                           json.loads(meta["layers"]), tasks, {}, tinted, model=model)
        per_task = {t: {k[len(t) + 1:]: v for k, v in saved.items() if k.startswith(f"{t}.")}
                    for t in tasks}
        rebuild = head_kinds()
        if tinted in rebuild:
            out_heads = {t: rebuild[tinted](per_task[t]) for t in tasks}
        else:
            tints = per_task
    lambdas = load_state_dict(folder / LAMBDAS, f"the lambdas in {folder}")["lambdas"]
    if not (folder / MERGED).is_file():
        raise TintError(f"{folder} holds no merged encoder ({MERGED})\nRun the method again "
                        "with save_merged=true to keep it.")
    state: StateDict = load_state_dict(folder / MERGED, f"the merged encoder in {folder}")
    return Merged(meta.get("method_name", "adapted"), state, out_heads, tints, lambdas,
                   json.loads(meta["layers"]), tasks, {}, tinted)
