"""LOT Merging against an independent float64 transcription of its closed forms
(``tests/lot_oracle.py``) on the tiny zoo, its defining pseudo-inverse, and its bad input."""

import pytest
import torch
from lot_oracle import lot_reference
from rich.console import Console

from tintcli.adaptation.lot import exemplar_index, lot_merge_state
from tintcli.errors import TintError
from tintcli.io import encoder_entries
from tintcli.methods import adapt, check_parameters


@pytest.fixture(scope="module")
def bench(tiny_cache):
    from conftest import compose_config

    from tintcli.workbench import Workbench

    return Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True))


def _oracle(bench, exemplars: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)  # the product's draw, task by task
    inputs = {}
    for task in bench.tasks:
        images = bench.test_data[task].images
        index = exemplar_index(len(images), exemplars, generator)
        inputs[task] = bench.runtime.inputs(images[index])
    return lot_reference(bench.encoder, encoder_entries(bench.pretrained),
                         {t: encoder_entries(bench.experts[t]) for t in bench.tasks}, inputs)


def test_lot_equals_the_oracle_weights_and_accuracies(bench):
    """Every merged entry equals the oracle's (linear weights by Eq. 9's pseudo-inverse,
    LayerNorm scales by the feature-weighted average, the rest by the mean), and so do the
    accuracies. Catches the Gram and moment built from another model's inputs, τ transposed,
    a plain inverse or mean in place of the closed forms, exemplars drawn differently."""
    adapted = adapt("lot", bench.pretrained, bench.experts, bench.adaptation_context(0),
                    exemplars=8)
    oracle = _oracle(bench, 8)
    ours = encoder_entries(adapted.state)
    assert ours.keys() == oracle.keys()
    for key, value in oracle.items():
        scale = value.abs().max().item() or 1.0
        assert (ours[key].double() - value).abs().max().item() <= 1e-5 * scale, key
    from tintcli.merged import Merged

    assert bench.score_merged(adapted) == bench.score_merged(Merged("oracle", {
        **bench.pretrained, **{k: v.float() for k, v in oracle.items()}}))


def test_lots_linear_layers_reach_the_least_squares_optimum(bench):
    """The first linear layer's merged task vector solves min Σt ‖Xt(T − τt)‖² (its gradient
    vanishes), and does better than the mean of τt. Catches a transposed τ or a pseudo-inverse
    dropped for the mean."""
    context = bench.adaptation_context(0)
    state = lot_merge_state(bench.pretrained, bench.experts, context, 8)
    name = "blocks.0.attn.qkv"
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for task in bench.tasks:  # the first block's qkv input: the expert's own norm1 output
        images = bench.test_data[task].images
        index = exemplar_index(len(images), 8, generator)
        encoder = bench.encoder
        encoder.load_state_dict(encoder_entries(bench.experts[task]))
        seen = []
        hook = encoder.get_submodule(name).register_forward_hook(
            lambda _m, args, _o, seen=seen: seen.append(
                args[0].double().reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            encoder(bench.runtime.inputs(images[index]))
        hook.remove()
        rows[task] = seen[0]
    key = f"{name}.weight"
    base = bench.pretrained[key].double()
    tau = {t: bench.experts[t][key].double() - base for t in bench.tasks}
    merged = state[key].double() - base
    mean = sum(tau.values()) / len(tau)
    def gradient(delta):
        return sum(x.T @ x @ (delta - tau[t]).T for t, x in rows.items()).abs().max().item()

    def drift(delta):
        return sum(((x @ (delta - tau[t]).T) ** 2).sum().item() for t, x in rows.items())

    assert gradient(merged) < 1e-3 * gradient(mean)  # (merged: rounded to float32)
    assert drift(merged) < drift(mean)


def test_lot_without_exemplars_fails_before_any_work():
    with pytest.raises(TintError, match="exemplars=0 must be a whole number >= 1"):
        check_parameters("lot", {"exemplars": 0})
