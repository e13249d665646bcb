"""Accuracy summaries: averages and normalised accuracy."""

import pytest

from tintcli.evaluation import summarize


def test_normalized_accuracy_is_merged_over_expert():
    out = summarize({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9})
    assert out["average"] == pytest.approx(0.7)
    assert out["normalized"] == {"a": 0.5, "b": 1.0}
    assert out["normalized_average"] == pytest.approx(0.75)


def test_an_expert_at_zero_accuracy_has_no_normalized_accuracy():
    out = summarize({"a": 0.0, "b": 0.4}, {"a": 0.0, "b": 0.8})
    assert out["normalized"]["a"] is None
    assert out["normalized_average"] == pytest.approx(0.5)
    assert summarize({"a": 0.0}, {"a": 0.0})["normalized_average"] is None
