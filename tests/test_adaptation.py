"""Test-time adaptive merging (PAPER.md): the lambda merge, the samplers, AdaMerging and
Model Tinting, checked against hand computations and on the tiny zoo."""

import math

import pytest
import torch
from rich.console import Console
from torch.func import functional_call

from tintcli.adaptation import LambdaMerger, pseudo_label_loss
from tintcli.adaptation.samplers import keep_all, keep_confident
from tintcli.errors import TintError
from tintcli.merging import adapt, task_vector, ties_merge, ties_task_vectors
from tintcli.merging.adamerging import AdaMerging, entropy
from tintcli.merging.tinting import Tinting

T = torch.tensor


def test_lambda_merge_matches_hand_computation_layer_and_task_wise():
    pre = {"a": T([1.0, 1.0]), "b": T([0.0]), "steps": T(3)}
    taus = [{"a": T([1.0, 0.0]), "b": T([2.0])}, {"a": T([0.0, 4.0]), "b": T([-1.0])}]
    layer = LambdaMerger(pre, taus, "layer", init=0.3)
    with torch.no_grad():
        layer.raw.copy_(T([[0.5, 0.25], [1.5, -2.0]]))  # second row clamps to [1, 0]
    out = layer()
    assert torch.allclose(out["a"], T([1.5, 2.0]))   # 1 + 0.5*[1,0] + 0.25*[0,4]
    assert torch.allclose(out["b"], T([2.0]))        # 0 + 1*2 + 0*(-1)
    assert out["steps"].item() == 3                  # integer buffers are never merged
    task = LambdaMerger(pre, taus, "task", init=0.3)
    assert task.raw.shape == (1, 2) and task.layer_names == ["all"]
    assert torch.allclose(task()["a"], T([1.3, 2.2]))


def test_lambda_gradient_is_the_inner_product_with_the_task_vector():
    pre = {"a": T([1.0, 2.0])}
    taus = [{"a": T([3.0, -1.0])}, {"a": T([0.5, 2.0])}]
    merger = LambdaMerger(pre, taus, "layer", init=0.3)
    upstream = T([2.0, 5.0])
    (merger()["a"] * upstream).sum().backward()
    # d/d lambda_k = <upstream, tau_k>
    assert torch.allclose(merger.raw.grad, T([[2 * 3 - 5.0, 2 * 0.5 + 5 * 2.0]]))


def test_ties_task_vectors_are_what_ties_dis_sum_adds_up():
    pre = {"w": T([0.0, 0.0, 0.0, 0.0])}
    experts = {"a": {"w": T([4.0, -1.0, 0.1, 3.0])}, "b": {"w": T([-2.0, 2.0, 0.2, 3.0])},
               "c": {"w": T([-3.0, 0.5, -5.0, 1.0])}}
    vectors = ties_task_vectors([task_vector(e, pre) for e in experts.values()], top_k=50)
    # top 50% per vector: a keeps 4,3; b keeps -2,2 (and 3); c keeps -3,-5
    # elected: [4-2-3 < 0 -> -, +, -, +]
    assert torch.equal(vectors[0]["w"], T([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(vectors[1]["w"], T([-2.0, 2.0, 0.0, 3.0]))
    assert torch.equal(vectors[2]["w"], T([-3.0, 0.0, -5.0, 0.0]))
    merged = ties_merge(pre, experts, top_k=50, merge="sum", lam=0.5)
    assert torch.allclose(merged["w"], 0.5 * sum(v["w"] for v in vectors))


def test_entropy_of_uniform_and_confident_predictions():
    assert math.isclose(entropy(torch.zeros(3, 5)).item(), math.log(5), rel_tol=1e-6)
    assert entropy(T([[100.0, 0.0, 0.0]])).item() < 1e-6


def test_confidence_sampler_keeps_agreement_and_a_confident_expert():
    expert = T([[3.0, 0.0], [3.0, 0.0], [0.5, 0.0], [1.0, 0.0]])
    merged = T([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    # agree | disagree, expert more confident | disagree, merged more confident | tie
    assert keep_confident(merged, expert).tolist() == [True, True, False, True]
    assert keep_all(merged, expert).all()


def test_a_batch_with_nothing_kept_gives_no_loss_and_no_nan():
    merged = T([[0.0, 9.0], [0.0, 9.0]], requires_grad=True)
    expert = T([[0.1, 0.0], [0.1, 0.0]])  # disagrees and less confident: all dropped
    loss, kept = pseudo_label_loss(merged, expert, keep_confident)
    assert kept == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(merged.grad, torch.zeros(2, 2))
    loss, kept = pseudo_label_loss(merged, expert, keep_all)
    assert kept == 2
    assert math.isclose(loss.item(), torch.nn.functional.cross_entropy(
        merged, T([0, 0])).item(), rel_tol=1e-6)


@pytest.fixture(scope="module")
def bench(tiny_cache):
    from conftest import compose_config

    from tintcli.recipes.common import Workbench

    return Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True))


def test_adamerging_gradient_equals_the_summed_loss_gradient(bench):
    """The per-task backward into detached weights + one backward through the merge gives
    exactly the gradient of the entropy summed over tasks."""
    context = bench.adaptation_context(seed=0)
    run = AdaMerging(bench.pretrained, bench.experts, context, "layer", lr=0.0)
    images = run.next_batches()
    run.step(images)
    ours = run.merger.raw.grad.clone()
    run.merger.raw.grad = None
    weights = run.merger()
    total = sum(entropy(context.head(t)(functional_call(run.encoder, weights, (images[t],))))
                for t in run.tasks)
    total.backward()
    assert torch.allclose(ours, run.merger.raw.grad, atol=1e-6)
    assert ours.abs().sum() > 0


def test_adamerging_lowers_the_entropy(bench):
    context = bench.adaptation_context(seed=0)
    # one batch = the whole adaptation set, so the loss is a function of lambda alone
    adapted = adapt("adamerging", bench.pretrained, bench.experts, context, steps=8,
                    lr=1e-2, batch_size=10_000)
    curve = adapted.loss_curve["loss"]
    assert len(curve) == 8 and curve[-1] < curve[0]
    assert adapted.lambdas.shape == (len(adapted.layer_names), 3)
    # rows run through the encoder from input to output, not in the checkpoint's name order
    assert adapted.layer_names[0] == "cls_token" and adapted.layer_names[-1] == "norm.bias"
    assert adapted.layer_names.index("patch_embed.proj.weight") < adapted.layer_names.index(
        "blocks.0.norm1.weight")
    assert not torch.allclose(adapted.lambdas, torch.full_like(adapted.lambdas, 0.3))
    assert ((adapted.lambdas >= 0) & (adapted.lambdas <= 1)).all()


def test_tinting_trains_heads_toward_the_experts(bench):
    context = bench.adaptation_context(seed=0)
    targets = context.expert_logits(bench.experts)
    adapted = adapt("tinting", bench.pretrained, bench.experts, context, epochs=6,
                    batch_size=10_000, lr=1e-2)
    curve = adapted.loss_curve["loss"]
    assert curve[-1] < curve[0]
    for task in adapted.tasks:  # the tinted heads moved off the zero-shot ones
        assert not torch.equal(adapted.heads[task].weight, bench.heads[task].weight)
    # the experts ran once: the same cached outputs serve every later method
    assert context.expert_logits(bench.experts) is targets
    expert_encoder = bench.encoder
    expert_encoder.load_state_dict(bench.experts["digits"])
    with torch.no_grad():
        direct = bench.heads["digits"](expert_encoder(context.images["digits"]))
    assert torch.allclose(direct, targets["digits"], atol=1e-5)


def test_tinting_an_encoder_module_instead_of_the_head(bench):
    context = bench.adaptation_context(seed=0)
    adapted = adapt("tinting", bench.pretrained, bench.experts, context, epochs=2,
                    tint="blocks.1.mlp.fc2")
    assert adapted.tinted == "blocks.1.mlp.fc2"
    for task in adapted.tasks:
        assert set(adapted.tints[task]) == {"blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias"}
        assert torch.equal(adapted.heads[task].weight, bench.heads[task].weight)  # frozen
    assert not torch.equal(adapted.tints["digits"]["blocks.1.mlp.fc2.weight"],
                           adapted.tints["signs"]["blocks.1.mlp.fc2.weight"])
    with pytest.raises(TintError, match="cannot tint 'blocks.9'"):
        Tinting(bench.pretrained, bench.experts, context, tint="blocks.9")
    with pytest.raises(TintError, match="sampler=sure must be one of: all, confidence"):
        adapt("tinting", bench.pretrained, bench.experts, context, sampler="sure")


@pytest.mark.parametrize(("method", "params", "message"), [
    ("tinting", {"lr": float("nan")}, "lr=nan must be a positive number"),
    ("adamerging", {"granularity": "diag"}, "granularity=diag must be 'task' or 'layer'"),
    ("adamerging", {"steps": 0}, "steps=0 must be a whole number >= 1"),
    ("adamerging", {"ties_top_k": 120}, r"ties_top_k=120 must be null or a percentage"),
    ("tinting", {"lam_init": 1.5}, r"lam_init=1.5 must be in \[0, 1\]"),
])
def test_bad_values_fail_before_any_work(method, params, message):
    from tintcli.merging import check_parameters

    with pytest.raises(TintError, match=rf"^bad parameters for method '{method}': {message}"):
        check_parameters(method, params)


@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_an_expert_with_nan_weights_is_named(bench, method):
    experts = dict(bench.experts)
    inf = torch.full_like(experts["digits"]["norm.weight"], float("inf"))
    experts["digits"] = {**experts["digits"], "norm.weight": inf}
    with pytest.raises(TintError, match=r"expert for task 'digits' has NaN/inf weights in "
                                        r"'norm.weight'"):
        adapt(method, bench.pretrained, experts, bench.adaptation_context(seed=0))


@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_a_nan_loss_stops_with_the_step_and_task(bench, method):
    context = bench.adaptation_context(seed=0)
    images = context.images["digits"].clone()
    images[0] = float("nan")  # one corrupt adaptation image
    context.images = {**context.images, "digits": images}
    with pytest.raises(TintError, match=rf"^{method}: the adaptation loss is nan at step "
                                        r"[123] on task 'digits'"):
        adapt(method, bench.pretrained, bench.experts, context, batch_size=10_000, **(
            {"steps": 2} if method == "adamerging" else {"epochs": 1, "sampler": "all"}))
