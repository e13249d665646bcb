"""Merging methods against results computed by hand (PAPER.md, Data-free merging)."""

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


def test_trim_keeps_top_k_over_the_whole_model():
    vec = {"a": T([0.1, -0.5, 0.3]), "b": T([0.4, -0.05])}
    out = trim_top_k(vec, 40)  # 40% of 5 entries = the 2 largest: -0.5 and 0.4
    assert torch.equal(out["a"], T([0.0, -0.5, 0.0]))
    assert torch.equal(out["b"], T([0.4, 0.0]))


def test_trim_keeps_entries_tied_at_the_boundary():
    vec = {"a": T([0.5, 0.1]), "b": T([-0.5, 0.2, 0.0])}
    out = trim_top_k(vec, 20)  # k = 1, but -0.5 ties with 0.5 at the boundary: both stay
    assert torch.equal(out["a"], T([0.5, 0.0]))
    assert torch.equal(out["b"], T([-0.5, 0.0, 0.0]))
    assert torch.equal(trim_top_k(vec, 100)["b"], vec["b"])
    assert torch.equal(trim_top_k(vec, 0)["a"], T([0.0, 0.0]))


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
    # top 50%: a keeps [4, -1, 0, 0], b keeps [0, 3, -2, 0]; sums [4, 2, -2, 0];
    # signs [+, +, -, majority(+)]; dis-sum = [4, 3, -2, 0]
    out = ties_merge(theta0, experts, top_k=50, merge="sum", lam=1.0)
    assert torch.allclose(out["w"], T([4.0, 3.0, -2.0, 0.0]))


def test_merge_errors_name_the_problem():
    with pytest.raises(TintError, match="unknown merging method 'nope'"):
        merge("nope", {}, {})
    with pytest.raises(TintError, match="bad parameters for method 'ties'"):
        merge("ties", sd([1.0]), {"a": sd([2.0])}, lamda=0.3)
    with pytest.raises(TintError, match="'mean' or 'sum'"):
        merge("ties", sd([1.0]), {"a": sd([2.0])}, merge="median")


def test_a_bug_inside_a_method_is_not_blamed_on_the_config():
    from tintcli.merging import MERGE_METHODS, Method

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
