"""Merging methods against results computed by hand (the papers' definitions, Data-free merging)."""

import pytest
import torch

from tintcli.errors import TintError
from tintcli.merging import (
    merge,
    task_arithmetic_merge,
    task_vector,
    ties_merge,
    trim_top_k,
    weight_average,
)
from tintcli.merging.ties import disjoint_merge, elect_signs

T = torch.tensor


def sd(w, b=None, steps=7):
    """A two-tensor model plus an integer buffer that must never be merged."""
    state = {"w": T(w, dtype=torch.float32), "steps": T(steps)}
    if b is not None:
        state["b"] = T(b, dtype=torch.float32)
    return state


def test_task_vector_skips_integer_buffers():
    tv = task_vector(sd([3.0, 1.0], steps=9), sd([1.0, 1.0], steps=7))
    assert set(tv) == {"w"}
    assert torch.equal(tv["w"], T([2.0, 0.0]))


def test_weight_average_is_the_mean_of_experts():
    out = weight_average(sd([0.0, 0.0], steps=5), {"a": sd([1.0, 2.0]), "b": sd([3.0, 6.0])})
    assert torch.equal(out["w"], T([2.0, 4.0]))
    assert out["steps"].item() == 5  # copied from the pretrained model


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    theta0 = sd([1.0, 1.0])
    experts = {"a": sd([2.0, 3.0]), "b": sd([4.0, -1.0])}  # tau = [1, 2] and [3, -2]
    out = task_arithmetic_merge(theta0, experts, lam=0.5)
    assert torch.allclose(out["w"], T([1.0 + 0.5 * 4, 1.0 + 0.5 * 0]))
    assert torch.allclose(merge("task_arithmetic", theta0, experts)["w"], T([2.2, 1.0]))


def test_trim_keeps_int_n_k_plus_one_entries_over_the_whole_model():
    vec = {"a": T([0.1, -0.5, 0.3]), "b": T([0.4, -0.05])}
    out = trim_top_k(vec, 40)  # int(5 * 0.4) + 1 = 3 entries: -0.5, 0.4 and 0.3
    assert torch.equal(out["a"], T([0.0, -0.5, 0.3]))
    assert torch.equal(out["b"], T([0.4, 0.0]))
    out = trim_top_k(vec, 30)  # int(1.5) + 1 = 2, not round(1.5) = 2 ... nor 1
    assert torch.equal(out["a"], T([0.0, -0.5, 0.0])) and torch.equal(out["b"], T([0.4, 0.0]))
    out = trim_top_k(vec, 10)  # int(0.5) + 1 = 1, where round(0.5) would keep none
    assert torch.equal(out["a"], T([0.0, -0.5, 0.0])) and torch.equal(out["b"], T([0.0, 0.0]))


def test_trim_keeps_entries_tied_at_the_boundary():
    vec = {"a": T([0.5, 0.1]), "b": T([-0.5, 0.2, 0.0, 0.3])}
    out = trim_top_k(vec, 10)  # keeps int(0.6) + 1 = 1, but -0.5 ties with 0.5: both stay
    assert torch.equal(out["a"], T([0.5, 0.0]))
    assert torch.equal(out["b"], T([-0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(trim_top_k(vec, 100)["b"], vec["b"])


def test_trim_rejects_a_fraction_given_as_percent_out_of_range():
    with pytest.raises(TintError, match="percentage"):
        trim_top_k({"a": T([1.0])}, 120)


# Two trimmed task vectors: sums are [-2, -1, 0, 2], so the elected signs are
# [-, -, ?, +]; three of the four entries lean negative, so the zero sum takes '-'.
TV1 = {"w": T([1.0, -2.0, 3.0, 1.0])}
TV2 = {"w": T([-3.0, 1.0, -3.0, 1.0])}


def test_sign_election_by_mass_and_majority_for_zero_sums():
    assert torch.equal(elect_signs([TV1, TV2])["w"], T([-1.0, -1.0, -1.0, 1.0]))


def test_sign_election_zero_sum_takes_positive_majority():
    a, b = {"w": T([2.0, 3.0, 1.0])}, {"w": T([-1.0, -3.0, 1.0])}  # sums [1, 0, 2]
    assert torch.equal(elect_signs([a, b])["w"], T([1.0, 1.0, 1.0]))


def test_disjoint_sum_and_mean_use_only_agreeing_entries():
    signs = elect_signs([TV1, TV2])
    assert torch.equal(disjoint_merge([TV1, TV2], signs, "sum")["w"], T([-3.0, -2.0, -3.0, 2.0]))
    assert torch.equal(disjoint_merge([TV1, TV2], signs, "mean")["w"], T([-3.0, -2.0, -3.0, 1.0]))


def test_ties_merge_end_to_end_dis_sum_and_dis_mean():
    theta0 = {"w": T([10.0, 10.0, 10.0, 10.0]), "steps": T(3)}
    experts = {"a": {"w": theta0["w"] + TV1["w"], "steps": T(1)},
               "b": {"w": theta0["w"] + TV2["w"], "steps": T(2)}}
    dis_sum = ties_merge(theta0, experts, top_k=100, merge="sum", lam=0.5)
    assert torch.allclose(dis_sum["w"], T([8.5, 9.0, 8.5, 11.0]))
    assert dis_sum["steps"].item() == 3
    dis_mean = ties_merge(theta0, experts, top_k=100, merge="mean", lam=0.5)
    assert torch.allclose(dis_mean["w"], T([8.5, 9.0, 8.5, 10.5]))


def test_ties_merge_with_trimming():
    theta0 = {"w": torch.zeros(4)}
    experts = {"a": {"w": T([4.0, -1.0, 0.5, 0.2])}, "b": {"w": T([-0.1, 3.0, -2.0, 0.3])}}
    # top 40% of 4 = int(1.6) + 1 = 2 entries: a keeps [4, -1, 0, 0], b keeps [0, 3, -2, 0];
    # sums [4, 2, -2, 0]; signs [+, +, -, majority(+)]; dis-sum = [4, 3, -2, 0]
    out = ties_merge(theta0, experts, top_k=40, merge="sum", lam=1.0)
    assert torch.allclose(out["w"], T([4.0, 3.0, -2.0, 0.0]))


def test_merge_errors_name_the_problem():
    with pytest.raises(TintError, match="unknown merging method 'nope'"):
        merge("nope", {}, {})
    with pytest.raises(TintError, match="bad parameters for method 'ties'"):
        merge("ties", sd([1.0]), {"a": sd([2.0])}, lamda=0.3)
    with pytest.raises(TintError, match="merge=median must be one of: mean, sum"):
        merge("ties", sd([1.0]), {"a": sd([2.0])}, merge="median")


def test_a_bug_inside_a_method_is_not_blamed_on_the_config():
    from tintcli.methods import MERGE_METHODS, Method

    def broken(pretrained, experts, lam=0.3):
        return len(None)  # a TypeError from the method's own code

    MERGE_METHODS["broken_for_test"] = Method(broken, adaptive=False)
    try:
        with pytest.raises(TypeError, match="NoneType"):
            merge("broken_for_test", {}, {}, lam=0.1)
        with pytest.raises(TintError, match="It takes: lam"):
            merge("broken_for_test", {}, {}, lamda=0.1)
    finally:
        del MERGE_METHODS["broken_for_test"]


# --------------------------------------------------------------------------------------------
# TIES against a straightforward port of the reference code (ties_merging_utils.py of the
# TIES / AdaMerging repositories): flatten the whole state dict, trim each row with
# kthvalue(d - int(d * K)) and >=, elect signs with the majority rule, disjoint merge,
# theta_0 + lam * merged, unflatten. Inputs are multiples of 0.5, so ties at the threshold
# and zero sums are frequent and every sum is exact.


def _reference_ties(flat_pre, flat_tvs, k_percent, merge_func, lam):
    K = k_percent / 100 if k_percent > 1 else k_percent
    M = flat_tvs.clone()
    d = M.shape[1]
    kth_values, _ = M.abs().kthvalue(d - int(d * K), dim=1, keepdim=True)
    updated = M * (M.abs() >= kth_values)
    sign_to_mult = torch.sign(updated.sum(dim=0))
    sign_to_mult[sign_to_mult == 0] = torch.sign(sign_to_mult.sum())
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, updated > 0, updated < 0)
    selected = updated * rows_to_keep
    if merge_func == "mean":
        counts = (selected != 0).sum(dim=0).float()
        merged = selected.sum(dim=0) / torch.clamp(counts, min=1)
    else:
        merged = selected.sum(dim=0)
    return flat_pre + lam * merged


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("k", [10, 20, 90])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_equals_a_port_of_the_reference_to_the_last_entry(k, merge_func, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.w": (7, 5), "blocks.0.b": (5,), "head.w": (3, 11), "norm": (13,)}
    half = lambda shape: torch.randint(-4, 5, shape, generator=g).float() / 2  # noqa: E731
    pretrained = {key: half(shape) for key, shape in shapes.items()}
    experts = {f"task{i}": {key: v + half(v.shape) for key, v in pretrained.items()}
               for i in range(4)}
    flatten = lambda sd: torch.cat([sd[key].flatten() for key in shapes])  # noqa: E731
    flat_tvs = torch.stack([flatten(e) - flatten(pretrained) for e in experts.values()])
    expected = _reference_ties(flatten(pretrained), flat_tvs, k, merge_func, lam=0.3)
    ours = ties_merge(pretrained, experts, top_k=k, merge=merge_func, lam=0.3)
    assert torch.equal(flatten(ours), expected)
    # the inputs plant what the conventions decide: ties at the threshold and zero sums
    kth = flat_tvs.abs().kthvalue(flat_tvs.shape[1] - int(flat_tvs.shape[1] * k / 100),
                                  dim=1, keepdim=True).values
    assert ((flat_tvs.abs() == kth).sum(1) > 1).any()
    trimmed = flat_tvs * (flat_tvs.abs() >= kth)
    assert ((trimmed.sum(0) == 0) & (trimmed != 0).any(0)).any()
