"""The run report's curves: validation and test points labelled apart (test scores are curves only), and no
legend asked of an empty plot (a run that never evaluated)."""

import warnings

import pytest

from megaclass.train.report import _plot

plt = pytest.importorskip("matplotlib.pyplot")


def _drawn(tmp_path, monkeypatch, history):
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend without labelled lines
        assert _plot(str(tmp_path / "report.png"), history, (1, 5)) is None
    assert (tmp_path / "report.png").stat().st_size > 0
    return figures[0].axes[1]


def test_validation_and_test_curves_are_labelled_apart(tmp_path, monkeypatch):
    scores = {"valid P@1": 0.5, "valid P@5": 0.2, "test P@1": 0.6, "test P@5": 0.3}
    history = [{"epoch": epoch, "train_loss": 1.0 / epoch, **scores} for epoch in (1, 2)]
    metrics = _drawn(tmp_path, monkeypatch, history)
    labels = [line.get_label() for line in metrics.lines]
    assert labels == ["valid P@1", "valid P@5", "test P@1 (curve)", "test P@5 (curve)"]
    assert [text.get_text() for text in metrics.get_legend().get_texts()] == labels


def test_a_run_that_never_evaluated_draws_its_loss_without_a_legend(tmp_path, monkeypatch):
    history = [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0}]
    metrics = _drawn(tmp_path, monkeypatch, history)
    assert len(metrics.lines) == 0 and metrics.get_legend() is None
