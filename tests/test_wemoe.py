"""WEMoE: the routed MLP against the per-sample merge FusionBench loops over, the
routers' start (task arithmetic at 0.3), what trains, the two schedules, saving and loading,
and the memory model with its refusal."""

import math

import pytest
import torch
from rich.console import Console
from timm.layers import Mlp
from torch.func import functional_call

from tintcli.adaptation.wemoe import RoutedMLP, Router, WEMoE, routers
from tintcli.errors import TintError
from tintcli.io import encoder_entries
from tintcli.merging import task_arithmetic_merge
from tintcli.methods import adapt, check_parameters


@pytest.fixture(scope="module")
def bench(tiny_cache):
    from conftest import compose_config

    from tintcli.workbench import Workbench

    return Workbench.load(compose_config(overrides=["device=cpu"]), Console(quiet=True))


def _mlp_and_vectors(tasks: int = 3, dim: int = 6, hidden: int = 10):
    g = torch.Generator().manual_seed(0)
    mlp = Mlp(dim, hidden)
    base = {k: torch.randn(v.shape, generator=g) for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(base)
    vectors = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()}
               for _ in range(tasks)]
    return mlp, base, vectors, g


def test_routed_mlp_is_the_per_sample_merge_of_its_task_vectors():
    """Sample b runs MLP(x_b; θ0 + Σt w_bt·τt) with w_b its router's output averaged over its
    tokens (FusionBench's loop of functional_call, one sample at a time); ``batch`` routing
    uses the batch's mean weights. Catches weights averaged over the wrong axis, a softmax, a
    task vector applied to another task's weight, or chunks mixed up at evaluation."""
    mlp, base, vectors, g = _mlp_and_vectors()
    routed = RoutedMLP(mlp, base, vectors, Router(6, 3, 0.3, g))
    with torch.no_grad():
        for p in routed.router.parameters():
            p.normal_(0, 0.5, generator=g)
    x = torch.randn(5, 4, 6, generator=g)
    w = routed.router(x).mean(1)

    def merged(weights):
        return {k: base[k] + sum(weights[t] * vectors[t][k] for t in range(3)) for k in base}

    expected = torch.cat([functional_call(mlp, merged(w[b]), (x[b:b + 1],)) for b in range(5)])
    assert torch.allclose(routed(x), expected, atol=1e-5)
    import tintcli.adaptation.wemoe as wemoe
    with torch.no_grad():  # evaluation forms the weights in chunks
        chunk, wemoe.EVAL_CHUNK = wemoe.EVAL_CHUNK, 2
        try:
            assert torch.allclose(routed(x), expected, atol=1e-5)
        finally:
            wemoe.EVAL_CHUNK = chunk
    routed.routing = "batch"
    assert torch.allclose(routed(x), functional_call(mlp, merged(w.mean(0)), (x,)), atol=1e-5)


def test_routers_start_at_task_arithmetic_and_only_they_train(bench):
    """With the routers' weights at zero the routed model is task arithmetic at init_lambda
    (the last layer's bias is 0.3 for every task vector); a step moves the routers and
    nothing else. Catches a wrong bias init, λ outside the MLPs other than init_lambda, or
    task vectors that train."""
    context = bench.adaptation_context(0)
    run = WEMoE(bench.pretrained, bench.experts, context, steps=2)
    for m in routers(run.model).values():
        assert torch.equal(m.router.fc2.bias, torch.full((len(bench.tasks),), 0.3))
        assert m.router.fc1.weight.std().item() == pytest.approx(0.01, rel=0.2)
    frozen = {k: v.clone() for k, v in run.model.state_dict().items() if ".router." not in k}
    images = run.next_batches()
    x = images[bench.tasks[0]]
    with torch.no_grad():
        for m in routers(run.model).values():
            m.router.fc1.weight.zero_()
            m.router.fc2.weight.zero_()
        encoder = bench.encoder
        encoder.load_state_dict(encoder_entries(task_arithmetic_merge(
            bench.pretrained, bench.experts, 0.3)))
        assert torch.allclose(run.model(x), encoder(x), atol=1e-5)
        for m in routers(run.model).values():
            m.router.fc2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in run.model.state_dict().items() if ".router." in k}
    run.step(images)
    after = run.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_routers_lr_follows_the_schedule(bench, schedule):
    """The authors anneal lr by a cosine over the run's steps; FusionBench keeps it constant.
    Catches an annealing period other than the steps, or a schedule that does not step."""
    run = WEMoE(bench.pretrained, bench.experts, bench.adaptation_context(0), lr=1e-3,
                steps=4, schedule=schedule, batch_size=4)
    for k in range(1, 3):
        run.step()
        lr = run.optimizer.param_groups[0]["lr"]
        want = 1e-3 * (1 + math.cos(math.pi * k / 4)) / 2 if schedule == "cosine" else 1e-3
        assert lr == pytest.approx(want)


def test_wemoe_loads_back_with_the_same_accuracies(bench, tmp_path):
    """Its routers are saved under adapted/ and the model, rebuilt around the pool's task
    vectors, scores as the trained one did; the saved λ are the mean routing weights."""
    from tintcli.adaptation.saved import load_adapted, save_adapted

    adapted = adapt("wemoe", bench.pretrained, bench.experts, bench.adaptation_context(0),
                    steps=2, batch_size=4, blocks=[0])
    assert adapted.layer_names == ["blocks.0.mlp"] and adapted.lambdas.shape == (1, 3)
    save_adapted(adapted, tmp_path / "wemoe", "WEMoE")
    loaded = load_adapted(tmp_path / "wemoe", bench.heads,
                          (bench.encoder, bench.pretrained, bench.experts))
    ours, back = (routers(m.model)["blocks.0.mlp"].router.state_dict()
                  for m in (adapted, loaded))
    assert all(torch.equal(ours[k], back[k]) for k in ours)
    assert not torch.equal(ours["fc2.bias"], torch.full((3,), 0.3))  # trained, not fresh
    assert bench.score_merged(loaded) == bench.score_merged(adapted)


def test_the_memory_model_counts_the_routed_model_and_refuses_what_cannot_fit():
    """B/32 × 8: 87.8 M parameters become 548.4 M (the authors' 574 M against 113 M count
    CLIP's 25 M text leftovers in both); a configuration over the limit is refused naming
    its size. Catches task vectors counted once instead of per task, or routers left out."""
    from conftest import compose_config

    from tintcli.adaptation.wemoe import wemoe_memory
    from tintcli.memory import GiB, check_fits

    b32 = compose_config(overrides=["encoder=clip_vit_b32"], tiny=False).encoder
    model = wemoe_memory(b32, 8, {"batch_size": 16, "blocks": None})
    mlp = 12 * (2 * 768 * 3072 + 3072 + 768)
    routers_ = 12 * (768 * 768 + 768 + 768 * 8 + 8)
    assert model.parameters == {"encoder": 87_849_216,
                                "routed model": 87_849_216 + 8 * mlp + routers_}
    assert model.terms["routed MLPs: θ0 + 8 task vectors (fp32)"] == 9 * mlp * 4
    check_fits("WEMoE", model, torch.device("cpu"), 100)
    with pytest.raises(TintError, match=r"WEMoE needs about 6\.\d\d GiB on cpu .*"
                                        r"memory_limit_gib=4"):
        check_fits("WEMoE", model, torch.device("cpu"), 4)
    assert model.total < 7 * GiB


def test_bad_wemoe_parameters_fail_before_any_work(bench):
    for params, message in (({"blocks": [99]}, "blocks=\\[99\\]: block 99"),
                            ({"blocks": []}, "must be a non-empty list"),
                            ({"routing": "token"}, "routing=token must be one of"),
                            ({"schedule": "linear"}, "schedule=linear")):
        with pytest.raises(TintError, match=message):
            check_parameters("wemoe", params, bench.encoder)
