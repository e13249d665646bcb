"""Test-time adaptive merging: the lambda merge, the samplers, AdaMerging and
Model Tinting, checked against hand computations and on the tiny zoo."""

import copy
import math

import pytest
import torch
from rich.console import Console
from torch.func import functional_call

from tintcli.adaptation import LambdaMerger, pseudo_label_loss
from tintcli.adaptation.adamerging import AdaMerging, entropy
from tintcli.adaptation.losses import LOSSES
from tintcli.adaptation.samplers import keep_all, keep_confident
from tintcli.adaptation.tinting import Tinting
from tintcli.errors import TintError
from tintcli.merging import (
    task_arithmetic_merge,
    task_vector,
    ties_merge,
    ties_task_vectors,
)
from tintcli.methods import adapt

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
    vectors = ties_task_vectors([task_vector(e, pre) for e in experts.values()], top_k=40)
    # top 40% of 4 = int(1.6) + 1 = 2 per vector: a keeps 4,3; b keeps -2,2 (and 3, tied);
    # c keeps -3,-5
    # elected: [4-2-3 < 0 -> -, +, -, +]
    assert torch.equal(vectors[0]["w"], T([0.0, 0.0, 0.0, 3.0]))
    assert torch.equal(vectors[1]["w"], T([-2.0, 2.0, 0.0, 3.0]))
    assert torch.equal(vectors[2]["w"], T([-3.0, 0.0, -5.0, 0.0]))
    merged = ties_merge(pre, experts, top_k=40, merge="sum", lam=0.5)
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

    from tintcli.workbench import Workbench

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
    # the heads it returns are the trained ones: on its own merged encoder they fit the
    # experts' pseudo-labels better than the zero-shot heads do
    encoder = bench.encoder
    encoder.load_state_dict(adapted.state)

    def pseudo_label_ce(heads):
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(
                heads[t](encoder(context.runtime.inputs(context.images[t]))),
                targets[t].argmax(-1))
                for t in adapted.tasks).item()

    assert pseudo_label_ce(adapted.heads) < pseudo_label_ce(bench.heads) - 0.1
    # the experts ran once: the same cached outputs serve every later method
    assert context.expert_logits(bench.experts) is targets
    expert_encoder = bench.encoder
    expert_encoder.load_state_dict(bench.experts["digits"])
    with torch.no_grad():
        direct = bench.heads["digits"](expert_encoder(
            context.runtime.inputs(context.images["digits"])))
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
    with pytest.raises(TintError, match="tint=blocks.9 names no module of the encoder"):
        adapt("tinting", bench.pretrained, bench.experts, context, tint="blocks.9")
    with pytest.raises(TintError, match="sampler=sure must be one of: all, confidence"):
        adapt("tinting", bench.pretrained, bench.experts, context, sampler="sure")


@pytest.mark.parametrize(("method", "params", "message"), [
    ("tinting", {"lr": float("nan")}, "lr=nan must be a positive number"),
    ("adamerging", {"granularity": "diag"}, "granularity=diag must be one of: task, layer"),
    ("adamerging", {"steps": 0}, "steps=0 must be a whole number >= 1"),
    ("adamerging", {"ties_top_k": 120}, r"ties_top_k=120 must be null or a percentage"),
    ("tinting", {"lam_init": 1.5}, r"lam_init=1.5 must be in \[0, 1\]"),
    ("surgery", {"rank": 0}, "rank=0 must be a whole number >= 1"),
    ("prob_surgery", {"lambdas": "/none.safetensors"}, "lambdas=/none.safetensors is no file"),
    ("prob_surgery", {"momentum_all_tasks": "yes"}, "momentum_all_tasks=yes must be true or"),
])
def test_bad_values_fail_before_any_work(method, params, message):
    from tintcli.methods import check_parameters

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
    head = copy.deepcopy(context.heads["digits"])
    with torch.no_grad():
        head.weight[0, 0] = float("nan")  # one corrupt weight: every logit of class 0 is nan
    context.heads = {**context.heads, "digits": head}
    with pytest.raises(TintError, match=rf"^{method}: the adaptation loss is nan at step "
                                        r"[123] on task 'digits'"):
        adapt(method, bench.pretrained, bench.experts, context, batch_size=10_000, **(
            {"steps": 2} if method == "adamerging" else {"epochs": 1, "sampler": "all"}))


def test_lambda_merger_starts_at_task_arithmetic_and_adamerging_pp_at_ties(bench):
    """At initialisation every lambda is 0.3: AdaMerging's model is task arithmetic at 0.3,
    and AdaMerging++'s is theta_0 + 0.3 * sum of the TIES-trimmed, sign-agreeing vectors
    (TIES dis-sum at 0.3), entry for entry."""
    context = bench.adaptation_context(seed=0)
    cases = [(AdaMerging(bench.pretrained, bench.experts, context, "layer"),
              task_arithmetic_merge(bench.pretrained, bench.experts, 0.3)),
             (AdaMerging(bench.pretrained, bench.experts, context, "task"),
              task_arithmetic_merge(bench.pretrained, bench.experts, 0.3)),
             (AdaMerging(bench.pretrained, bench.experts, context, "layer", ties_top_k=20),
              ties_merge(bench.pretrained, bench.experts, top_k=20, merge="sum", lam=0.3))]
    for run, expected in cases:
        with torch.no_grad():
            merged = run.merger()
        assert set(merged) == set(expected)
        for key, value in expected.items():
            assert torch.allclose(merged[key], value, atol=1e-6), key


def test_tinting_schedule_one_step_per_task_per_epoch_in_a_seeded_shuffled_order(
        bench, monkeypatch):
    def visits(seed: int, epochs: int) -> list[str]:
        seen: list[str] = []
        monkeypatch.setattr(Tinting, "step",
                            lambda self, task, batch=None: seen.append(task) or 1.0)
        adapted = adapt("tinting", bench.pretrained, bench.experts,
                        bench.adaptation_context(seed), epochs=epochs)
        assert len(adapted.loss_curve["loss"]) == epochs
        return seen

    tasks = sorted(bench.tasks)
    order = visits(seed=0, epochs=8)
    assert len(order) == 8 * len(tasks)
    epochs = [order[i : i + len(tasks)] for i in range(0, len(order), len(tasks))]
    assert all(sorted(epoch) == tasks for epoch in epochs)  # each task once per epoch
    assert len({tuple(epoch) for epoch in epochs}) > 1       # a new order each epoch
    assert visits(seed=0, epochs=8) == order                 # seeded
    assert visits(seed=1, epochs=8) != order


def test_tinting_pp_judges_the_current_model_with_the_current_tinted_head(bench):
    """The confidence sampler compares the expert with the model being adapted: the merged
    encoder at the current lambda and the task's head as tinted so far."""
    context = bench.adaptation_context(seed=0)
    run = Tinting(bench.pretrained, bench.experts, context, sampler="all")
    for task in run.tasks * 2:  # lambda and the heads move off their starting values
        run.step(task)
    seen = []
    sampler = keep_confident
    run.loss_fn = lambda logits, features, targets: pseudo_label_loss(
        logits.float(), targets, lambda merged, expert: seen.append(
            (merged.detach(), expert)) or sampler(merged, expert))
    images, targets = run.next_batch("digits")
    with torch.no_grad():
        features = functional_call(run.encoder, run.merger(), (images,))
        current = run.heads["digits"](features)
        zero_shot = bench.heads["digits"](features)
    run.step("digits", (images, targets))
    merged_logits, expert_logits = seen[0]
    assert torch.allclose(merged_logits, current, atol=1e-5)
    assert not torch.allclose(merged_logits, zero_shot, atol=1e-3)
    assert torch.equal(expert_logits, targets)


@pytest.mark.parametrize("fused", [False, True])
def test_tinting_takes_no_step_when_no_sample_is_kept(bench, fused):
    """A batch where the sampler keeps nothing moves nothing: not λ, not a head, not Adam's
    moments or step count (its momentum alone would move them). The CPU's Adam is told on
    the host; a fused Adam (CUDA's) skips on the device, told by the kept count there."""
    context = bench.adaptation_context(seed=0)
    run = Tinting(bench.pretrained, bench.experts, context, sampler="all")
    if fused:
        run.optimizer = torch.optim.Adam(run.optimizer.param_groups[0]["params"], lr=1e-2,
                                         fused=True)
    run.step("digits")  # Adam has momentum now
    assert run.optimizer.state  # (it took a step)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    adam = copy.deepcopy(run.optimizer.state_dict()["state"])
    run.loss_fn = lambda logits, features, targets: pseudo_label_loss(
        logits.float(), targets, lambda merged, expert: torch.zeros(len(expert),
                                                                    dtype=torch.bool))
    assert float(run.step("digits")) == 0.0
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    after = run.optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][k], adam[i][k]) for i in adam for k in adam[i])
    assert run.steps_done == 2


class RecordingHead(torch.nn.Module):
    """A head that remembers the features it was given."""

    def __init__(self, head):
        super().__init__()
        self.head, self.seen = head, []

    def forward(self, features):
        self.seen.append(features.detach())
        return self.head(features)


def test_scoring_an_adapted_model_uses_each_tasks_tinted_head_and_entries(bench):
    from tintcli.evaluation import accuracy
    from tintcli.merged import Merged

    state = task_arithmetic_merge(bench.pretrained, bench.experts, 0.3)
    heads = {t: RecordingHead(h) for t, h in bench.heads.items()}
    tints = {"signs": {"norm.bias": state["norm.bias"] + 1.0}}
    adapted = Merged("tinting", state, heads, tints, torch.zeros(1, 3), ["all"], bench.tasks,
                      {}, "norm")
    scores = bench.score_merged(adapted)
    encoder = bench.encoder
    for task in bench.tasks:
        split = bench.test_data[task]
        encoder.load_state_dict({**state, **tints.get(task, {})})
        with torch.no_grad():
            features = encoder(bench.runtime.inputs(split.images))
        assert torch.allclose(torch.cat(heads[task].seen), features, atol=1e-5), task
        assert scores[task] == accuracy(encoder, heads[task].head, split.images, split.labels,
                                        bench.runtime)
    encoder.load_state_dict(state)
    with torch.no_grad():
        untinted = encoder(bench.runtime.inputs(bench.test_data["signs"].images))
    assert not torch.allclose(torch.cat(heads["signs"].seen), untinted, atol=1e-3)


@pytest.mark.parametrize("tint", ["head", "blocks.1.mlp.fc2"])
def test_a_saved_adapted_model_loads_back_with_the_same_accuracies(bench, tmp_path, tint):
    from tintcli.adaptation.saved import load_adapted, save_adapted

    adapted = adapt("tinting", bench.pretrained, bench.experts, bench.adaptation_context(0),
                    epochs=3, tint=tint)
    files = save_adapted(adapted, tmp_path, "Model Tinting")
    loaded = load_adapted(tmp_path, bench.heads)
    assert loaded.tasks == adapted.tasks and loaded.tinted == tint
    assert torch.equal(loaded.lambdas, adapted.lambdas)
    assert bench.score_merged(loaded) == bench.score_merged(adapted)
    if tint == "head":  # the tinted heads, not the zero-shot ones, came back
        assert set(files) >= {"tints", "merged", "lambdas", "heatmap"}
        for task in adapted.tasks:
            assert torch.equal(loaded.heads[task].weight, adapted.heads[task].weight)
            assert not torch.equal(loaded.heads[task].weight, bench.heads[task].weight)
    else:
        assert loaded.tints.keys() == adapted.tints.keys()
        for task, entries in adapted.tints.items():
            assert all(torch.equal(loaded.tints[task][k], v) for k, v in entries.items())


@pytest.mark.parametrize("method", ["adamerging", "tinting"])
def test_steps_run_under_the_runs_precision(bench, method):
    """precision=bf16 (AMP) reaches the adaptation forward: its matmuls run in bf16."""
    import dataclasses

    context = bench.adaptation_context(seed=0)
    context.runtime = dataclasses.replace(context.runtime, precision="bf16")
    seen = []
    handle = context.encoder.blocks[0].mlp.fc1.register_forward_hook(
        lambda m, i, out: seen.append(out.dtype))
    try:
        adapt(method, bench.pretrained, bench.experts, context, batch_size=8,
              **({"steps": 1} if method == "adamerging" else {"epochs": 1}))
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_task_vectors_stored_in_bf16_merge_as_in_fp32(bench):
    context = bench.adaptation_context(seed=0)
    pretrained, vectors = context.task_vectors(bench.pretrained, bench.experts)
    exact = LambdaMerger(pretrained, vectors, "layer", 0.3)
    half = LambdaMerger(pretrained, vectors, "layer", 0.3, vectors_dtype=torch.bfloat16)
    assert {half.get_buffer(f"stacked{g}").dtype for g in range(len(half.groups))} == {
        torch.bfloat16}
    merged, approx = exact(), half()
    for key in exact.keys:
        scale = merged[key].abs().max().item() + 1e-6
        assert (merged[key] - approx[key]).abs().max().item() <= 1e-2 * scale, key


@pytest.mark.parametrize("loss", ["l1feature", "selfentropy", "crossgt"])
def test_each_symerge_loss_learns_from_its_own_target(bench, loss):
    """SyMerge's losses (losses.py): the trainer's targets are the experts' features
    (l1feature), nothing (selfentropy) or the true labels (crossgt), and its first step's loss
    is that loss of the merged model at λ's start (task arithmetic at 0.3) with the zero-shot
    heads, computed here from scratch. Catches a loss wired to the wrong target (the expert's
    logits where features are meant), the head's output where features are meant, or a
    loss that never reaches the step."""
    context = bench.adaptation_context(seed=0)
    task = "digits"
    run = Tinting(bench.pretrained, bench.experts, context, loss=loss)
    inputs = context.runtime.inputs(context.images[task])
    expert = copy.deepcopy(bench.encoder)
    expert.load_state_dict(bench.experts[task])
    with torch.no_grad():
        features = expert(inputs)
    if loss == "l1feature":
        assert torch.allclose(run.targets[task], features, atol=1e-5)
    elif loss == "crossgt":
        assert torch.equal(run.targets[task], bench.test_data[task].labels)
    else:
        assert run.targets is None
    x, index = inputs[:16], torch.arange(16)
    targets = None if run.targets is None else run.targets[task][index]
    merged = copy.deepcopy(bench.encoder)
    merged.load_state_dict(task_arithmetic_merge(bench.pretrained, bench.experts, lam=0.3))
    with torch.no_grad():
        z = merged(x)
        logits = bench.heads[task](z)
    expected = {"l1feature": lambda: (z - features[:16]).abs().mean(),
                "selfentropy": lambda: entropy(logits),
                "crossgt": lambda: torch.nn.functional.cross_entropy(logits, targets)}[loss]()
    assert float(run.step(task, (x, targets))) == pytest.approx(expected.item(), rel=1e-5)


def test_symerge_is_model_tinting_pp_under_its_final_name_and_crossgt_needs_oracle(bench):
    """The same trainer, the same numbers (λ and heads bitwise); the true-label loss is
    refused without oracle=true, before any work."""
    from tintcli.methods import check_parameters

    ours = adapt("symerge", bench.pretrained, bench.experts, bench.adaptation_context(seed=0),
                 epochs=2)
    pp = adapt("tinting", bench.pretrained, bench.experts, bench.adaptation_context(seed=0),
               epochs=2, sampler="confidence")
    assert torch.equal(ours.lambdas, pp.lambdas)
    assert all(torch.equal(ours.heads[t].weight, pp.heads[t].weight) for t in ours.tasks)
    plain = adapt("tinting", bench.pretrained, bench.experts, bench.adaptation_context(seed=0),
                  epochs=2)
    assert not torch.equal(plain.lambdas, pp.lambdas)  # the sampler decides the numbers
    with pytest.raises(TintError, match="loss=crossgt learns from the test images' true"):
        check_parameters("symerge", {"loss": "crossgt"})
    check_parameters("symerge", {"loss": "crossgt", "oracle": True})
    with pytest.raises(TintError, match="applies to loss=crosspseudo, not loss=selfentropy"):
        check_parameters("tinting", {"loss": "selfentropy", "sampler": "confidence"})


def test_a_surgery_adapter_starts_as_the_identity_and_subtracts_its_correction():
    """z' = z − W_up·ReLU(W_down·z), W_up zero at the start. Catches the
    correction added instead of subtracted, a missing ReLU, or an adapter that does not start
    as the identity."""
    from tintcli.adaptation.surgery import SurgeryAdapter

    z = T([[1.0, -2.0, 0.5]])
    fresh = SurgeryAdapter(3, rank=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fresh(z), z) and fresh.down.weight.abs().sum() > 0
    with torch.no_grad():
        fresh.down.weight.copy_(T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # ReLU: [1, 0]
        fresh.up.weight.copy_(T([[2.0, 5.0], [0.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(fresh(z), z - T([[2.0, 0.0, 1.0]]))


def test_surgery_keeps_the_given_lambdas_and_loads_back_with_the_same_accuracies(bench,
                                                                                 tmp_path):
    """λ from a finished AdaMerging's lambdas.safetensors stay as they are (only adapters
    learn); each task is scored through its own adapter, and the saved run loads back to the
    same accuracies. A file for other tasks is refused by name."""
    from tintcli.adaptation.saved import load_adapted, save_adapted
    from tintcli.adaptation.surgery import SurgeryHead
    from tintcli.methods import check_parameters

    ada = adapt("adamerging", bench.pretrained, bench.experts, bench.adaptation_context(0),
                steps=2)
    save_adapted(ada, tmp_path / "ada", "AdaMerging", merged=False)
    lambdas = str(tmp_path / "ada" / "lambdas.safetensors")
    adapted = adapt("surgery", bench.pretrained, bench.experts, bench.adaptation_context(0),
                    lambdas=lambdas, epochs=3)
    assert torch.equal(adapted.lambdas, ada.lambdas)
    assert all(isinstance(adapted.heads[t], SurgeryHead) for t in adapted.tasks)
    save_adapted(adapted, tmp_path / "surgery", "Surgery")
    loaded = load_adapted(tmp_path / "surgery", bench.heads)
    assert bench.score_merged(loaded) == bench.score_merged(adapted)
    for task in adapted.tasks:  # the trained adapters came back, not fresh (identity) ones
        ours, back = adapted.heads[task].state_dict(), loaded.heads[task].state_dict()
        assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
        assert ours["adapter.up.weight"].abs().sum() > 0  # (a fresh adapter's is zero)
    with pytest.raises(TintError, match="lambdas=.* is no file"):
        check_parameters("surgery", {"lambdas": str(tmp_path / "missing.safetensors")})
    other = copy.deepcopy(ada)
    other.tasks = ["a", "b", "c"]
    save_adapted(other, tmp_path / "other", "AdaMerging", merged=False)
    with pytest.raises(TintError, match=r"were learned for the tasks \['a', 'b', 'c'\]"):
        adapt("surgery", bench.pretrained, bench.experts, bench.adaptation_context(0),
              lambdas=str(tmp_path / "other" / "lambdas.safetensors"), epochs=1)


def test_prob_surgery_samples_the_correction_adds_its_kl_and_evaluates_with_the_mean(bench):
    """ProbSurgery: training sees z − (μ + ε·σ) with σ = exp(log σ² / 2), the loss
    is L1 + kl_weight·KL(N(μ, σ²) ‖ N(0, I)), evaluation z − μ. Catches σ taken as the
    variance, the KL's sign or weight, or evaluation with a sample instead of the mean."""
    from tintcli.adaptation.surgery import ProbSurgeryAdapter, Surgery, SurgeryHead

    z = T([[1.0, -2.0, 0.5]])
    adapter = ProbSurgeryAdapter(3, hidden=2, generator=torch.Generator().manual_seed(0))
    adapter.requires_grad_(False)
    fresh, kl = adapter.train_forward(z, torch.Generator().manual_seed(1))
    assert torch.equal(adapter(z), z) and float(kl) == 0.0  # μ = 0, log σ² = 0 at the start
    assert torch.equal(fresh, z - torch.randn(1, 3, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        adapter.up.weight.copy_(T([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))  # h = [1, 1]
        adapter.mean.weight.copy_(T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # μ = [1, 1, 2]
        adapter.log_var.weight.copy_(T([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # [0, 1, 1]
    mu, log_var = T([1.0, 1.0, 2.0]), T([0.0, 1.0, 1.0])
    assert torch.allclose(adapter(z), z - mu)
    sampled, kl = adapter.train_forward(z, torch.Generator().manual_seed(1))
    eps = torch.randn(1, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sampled, z - (mu + eps * (0.5 * log_var).exp()))
    assert float(kl) == pytest.approx(float(-0.5 * (1 + log_var - mu ** 2 - log_var.exp()).sum()))

    context = bench.adaptation_context(seed=0)
    run = Surgery(bench.pretrained, bench.experts, context, hidden=4, kl_weight=0.5)
    task = "digits"
    with torch.no_grad():
        for weight in (run.adapters[task].mean.weight, run.adapters[task].log_var.weight):
            weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    features, targets = run.features[task][:16], run.targets[task][:16]
    replay = torch.Generator()
    replay.set_state(run.generator.get_state())
    with torch.no_grad():
        corrected, kl = run.adapters[task].train_forward(features, replay)
    expected = torch.nn.functional.l1_loss(corrected, targets) + 0.5 * kl
    assert float(kl) > 0.01
    assert float(run.step(task, (features, targets))) == pytest.approx(float(expected), rel=1e-5)
    # saved as a head, it comes back as ProbSurgery's adapter (evaluating with the mean)
    head = run.result().heads[task]
    back = SurgeryHead.from_state_dict(head.state_dict())
    assert isinstance(back.adapter, ProbSurgeryAdapter)
    assert torch.equal(back(features.cpu()), head(features.cpu()))


def test_surgery_reuses_the_runs_layer_wise_adamerging_lambdas(bench):
    """In one run (one context), layer-wise AdaMerging leaves its λ and Surgery with no
    lambdas= takes them instead of learning them again; task-wise AdaMerging or AdaMerging++
    leave none. Catches Surgery relearning (slow, and not the row it sits beside) or starting
    from the λ of another variant."""
    from tintcli.adaptation.adamerging import LAYER_WISE

    context = bench.adaptation_context(0)
    adapt("adamerging", bench.pretrained, bench.experts, context, steps=1, granularity="task")
    adapt("adamerging", bench.pretrained, bench.experts, context, steps=1, ties_top_k=20)
    assert LAYER_WISE not in context.learned
    ada = adapt("adamerging", bench.pretrained, bench.experts, context, steps=2)
    assert torch.equal(context.learned[LAYER_WISE], ada.lambdas)
    planted = torch.rand(ada.lambdas.shape, generator=torch.Generator().manual_seed(3))
    context.learned[LAYER_WISE] = planted
    adapted = adapt("surgery", bench.pretrained, bench.experts, context, epochs=1)
    assert torch.equal(adapted.lambdas, planted)


def test_surgery_refuses_the_lambdas_of_another_encoder_or_a_task_wise_run(bench, tmp_path):
    """A lambdas.safetensors from a task-wise AdaMerging (one row, 'all') or one whose layers
    this encoder lacks is one error before any work, naming the layer."""
    from tintcli.adaptation.saved import save_adapted
    from tintcli.methods import check_parameters

    task_wise = adapt("adamerging", bench.pretrained, bench.experts,
                      bench.adaptation_context(0), steps=1, granularity="task")
    save_adapted(task_wise, tmp_path / "task", "AdaMerging", merged=False)
    with pytest.raises(TintError, match="not a layer-wise AdaMerging's λ for this encoder "
                                        r"\(it has no layer 'all'\)"):
        check_parameters("surgery", {"lambdas": str(tmp_path / "task" / "lambdas.safetensors")},
                         bench.encoder)


def _device_reads(run, step) -> list[str]:
    """The reads back from the device that ``step()`` makes, as torch dispatches them: a
    tensor's value read on the host (``.item()``, ``int()``, ``bool()``, a Python ``if`` on
    one) or a boolean mask indexed with (its count is read). On a GPU each one waits for every
    kernel queued before it. Adam's step counters (CPU tensors by design) aside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counters = {id(s["step"]) for s in run.optimizer.state.values()}
    seen: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) not in \
                    counters:
                seen.append("a value read")
            if func is torch.ops.aten.index.Tensor and any(
                    i is not None and i.dtype == torch.bool for i in args[1]):
                seen.append("a boolean mask")
            if func is torch.ops.aten.nonzero.default:
                seen.append("nonzero")
            return func(*args, **(kwargs or {}))

    with Reads():
        step()
    return seen


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def on_device(request, bench):
    """The benchmark on the CPU, and where there is one on a CUDA device in fp32 (there the
    compiled path runs as CUDA graphs: what a GPU session checks first), with how close
    compiled and eager numbers must be there (a GPU's fused kernels round differently)."""
    if request.param == "cpu":
        return bench, {"rel": 1e-5, "abs": 1e-6}
    from conftest import compose_config

    from tintcli.workbench import Workbench

    cfg = compose_config(overrides=["device=cuda", "precision=fp32"])
    return Workbench.load(cfg, Console(quiet=True)), {"rel": 1e-4, "abs": 1e-5}


def test_a_model_tinting_step_never_waits_for_the_device(on_device):
    """Model Tinting's step keeps its loss on the device, draws its batch from a permutation
    already there, and reads nothing back: the host can queue the next step while the GPU
    runs this one (the epoch reads its losses back once, and checks them). Tinting++'s
    sampler weighs samples by 1 or 0 on the device (no mask indexed with), and with a fused
    Adam (CUDA's) a batch with nothing kept is skipped there too; the CPU's Adam reads that
    count, once (on the CPU nothing waits)."""
    bench, _ = on_device
    context = bench.adaptation_context(seed=0)
    run = Tinting(bench.pretrained, bench.experts, context, sampler="all")
    run.step("digits")  # Adam's state exists from here on
    assert _device_reads(run, lambda: run.step("digits")) == []
    run.loss_fn = LOSSES["crosspseudoconf"]
    fused = bool(run.optimizer.defaults.get("fused"))
    assert fused == (bench.device.type == "cuda")  # (Runtime.adam)
    assert _device_reads(run, lambda: run.step("digits")) == ([] if fused else ["a value read"])
    run.optimizer = torch.optim.Adam(run.optimizer.param_groups[0]["params"], lr=1e-2,
                                     fused=True)
    run.step("digits")
    assert _device_reads(run, lambda: run.step("digits")) == []


def test_a_compiled_adamerging_step_learns_what_the_eager_step_learns(on_device):
    """AdaMerging's step on the compiled path (runtime.compile): the merge is compiled, each
    task's backward stops at detached merged weights, and one backward then runs through the
    compiled merge to λ. Five steps give the eager run's losses and λ up to float rounding."""
    from dataclasses import replace

    bench, close = on_device

    def five_steps(compiled: bool) -> tuple[list[float], torch.Tensor]:
        context = bench.adaptation_context(seed=0)
        context.runtime = replace(context.runtime, compile=compiled)
        run = AdaMerging(bench.pretrained, bench.experts, context, "layer", lr=1e-2)
        return [run.step() for _ in range(5)], run.merger.lambdas().detach()

    (eager, eager_lambdas), (compiled, compiled_lambdas) = five_steps(False), five_steps(True)
    assert compiled == pytest.approx(eager, **close)
    assert torch.allclose(compiled_lambdas, eager_lambdas, atol=close["abs"])
    assert (eager_lambdas - 0.3).abs().max() > 1e-3  # (it learned)


def test_the_compiled_step_learns_what_the_eager_step_learns(on_device):
    """runtime.compile=true runs the adaptation step's merge and encoder through torch.compile
    (on a GPU, as CUDA graphs): three epochs of Model Tinting give the eager run's losses and
    λ up to float rounding (inductor fuses, eager does not), both really are the
    compiled ones, and a step launches under half the operations of an eager step (the
    merge's hundreds of views and the encoder's elementwise chains become a few fused
    kernels)."""
    from dataclasses import replace

    bench, close = on_device

    def three_epochs(compiled: bool) -> tuple[list[float], torch.Tensor, Tinting]:
        context = bench.adaptation_context(seed=0)
        context.runtime = replace(context.runtime, compile=compiled)
        run = Tinting(bench.pretrained, bench.experts, context)
        losses = [float(run.step(task)) for task in run.tasks * 3]
        return losses, run.merger.lambdas().detach(), run

    eager, eager_lambdas, run = three_epochs(False)
    compiled, compiled_lambdas, compiled_run = three_epochs(True)
    assert not hasattr(run.forward, "_torchdynamo_orig_callable")
    assert hasattr(compiled_run.forward, "_torchdynamo_orig_callable")
    assert isinstance(compiled_run.merge, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled == pytest.approx(eager, **close)
    assert torch.allclose(compiled_lambdas, eager_lambdas, atol=close["abs"])
    assert not torch.equal(eager_lambdas, torch.full_like(eager_lambdas, 0.3))  # (it learned)
    from tintcli.recipes.bench import operations

    launched = operations(lambda: compiled_run.step("digits"))
    assert launched < operations(lambda: run.step("digits")) / 2

def test_each_methods_checkpoint_is_keyed_by_every_parameter_it_declares(bench, monkeypatch):
    """The resume key holds the value of every parameter in the method's signature (they
    were hand-copied into a dict, so one left out would let a rerun with another value resume
    a checkpoint made with the first), and names the method (ProbSurgery's was renamed after
    its trainer was built). The trainers stop at their first step here."""
    from tintcli.adaptation.run import AdaptationRun
    from tintcli.methods import registered

    class Stop(Exception):
        pass

    keys = {}

    def train(self, total, params):
        keys[self.name] = dict(params)
        raise Stop

    context = bench.adaptation_context(0)
    adapt("adamerging", bench.pretrained, bench.experts, context, steps=1)  # Surgery's λ
    monkeypatch.setattr(AdaptationRun, "train", train)
    for name, method in registered().items():
        if not method.adaptive or name == "lot":  # LOT: a closed form, nothing to resume
            continue
        keys.clear()
        with pytest.raises(Stop):
            adapt(name, bench.pretrained, bench.experts, context)
        trainer = "tinting" if name == "symerge" else name  # SyMerge is Model Tinting's run
        assert set(keys) == {trainer}, name
        declared = registered()[trainer].defaults
        assert set(keys[trainer]) == set(declared), name


def _adaptive_methods() -> list[str]:
    from tintcli.methods import registered

    return [name for name, method in registered().items() if method.adaptive]


@pytest.mark.parametrize("name", _adaptive_methods())
def test_every_adaptive_method_loads_back_with_the_same_accuracies(bench, tmp_path, name):
    """Whatever a method learns (λ, tinted heads, Surgery's adapters, WEMoE's routers, LOT's
    closed form), save_adapted writes it and load_adapted rebuilds a model that scores the
    same on every task: a new method whose outcome saved.py cannot write or read fails here.
    One short schedule each."""
    from tintcli.adaptation.saved import load_adapted, save_adapted
    from tintcli.methods import registered

    short = {k: v for k, v in {"steps": 1, "epochs": 1, "exemplars": 8}.items()
             if k in registered()[name].defaults}
    context = bench.adaptation_context(0)
    if name in ("surgery", "prob_surgery"):  # their λ: a short layer-wise AdaMerging's
        adapt("adamerging", bench.pretrained, bench.experts, context, steps=1)
    adapted = adapt(name, bench.pretrained, bench.experts, context, **short)
    save_adapted(adapted, tmp_path, name)
    loaded = load_adapted(tmp_path, bench.heads, (bench.encoder, bench.pretrained,
                                                  bench.experts))
    assert loaded.tasks == adapted.tasks and loaded.tinted == adapted.tinted, name
    assert torch.equal(loaded.lambdas, adapted.lambdas), name
    for task in adapted.heads:  # the learned heads (tinted, or Surgery's adapters) came back
        ours, theirs = loaded.heads[task].state_dict(), adapted.heads[task].state_dict()
        assert ours.keys() == theirs.keys(), (name, task)
        assert all(torch.equal(ours[k], v) for k, v in theirs.items()), (name, task)
    assert (loaded.model is None) == (adapted.model is None), name  # WEMoE's routed model
    assert bench.score_merged(loaded) == bench.score_merged(adapted), name
