"""The validation split: held-out rows drawn from the seed alone and disjoint from the rows trained on; the
epoch kept and early stopping decided on them; the kept weights survive a resume; the test file scored once
at the end; a run that ends at the label prior stops with a one-line error."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megaclass.cli import main
from megaclass.data.loaders import open_dataset
from megaclass.data.tokenized import TokenDataset, TokenIds
from megaclass.data.xmc import CSR, label_features
from megaclass.state_io import read_state
from megaclass.train.loop import LoopState, Trainer
from megaclass.train.validation import held_out_rows, label_prior_share, take_rows


def test_held_out_rows_are_a_seeded_capped_fraction():
    rows = held_out_rows(1000, fraction=0.05, max_rows=10_000, seed=3)
    assert rows.shape == (50,) and np.all(np.diff(rows) > 0) and 0 <= rows[0] and rows[-1] < 1000
    assert np.array_equal(rows, held_out_rows(1000, fraction=0.05, max_rows=10_000, seed=3))
    assert not np.array_equal(rows, held_out_rows(1000, fraction=0.05, max_rows=10_000, seed=4))
    assert held_out_rows(1000, fraction=0.5, max_rows=7, seed=0).shape == (7,)
    assert held_out_rows(1000, fraction=0.0, max_rows=7, seed=0).shape == (0,)
    assert held_out_rows(1, fraction=0.9, max_rows=7, seed=0).shape == (0,)  # never every row


def test_take_rows_of_sparse_rows_is_those_rows_alone(deb_tags_slice):
    train, _ = deb_tags_slice(60, 10)
    data = open_dataset(train)
    rows = np.array([3, 17, 59, 0])
    part = take_rows(data, rows)
    assert len(part) == 4 and part.num_classes == data.num_classes and part.multilabel
    for position, row in enumerate(rows):
        mine, theirs = part.batch(np.array([position])), data.batch(np.array([row]))
        assert torch.equal(mine.inputs.indices, theirs.inputs.indices)
        assert torch.equal(mine.targets.indices, theirs.targets.indices)
    counts = np.zeros(data.num_classes, dtype=np.int64)
    for row in rows:
        np.add.at(counts, data.labels.indices[data.labels.indptr[row] : data.labels.indptr[row + 1]], 1)
    assert np.array_equal(part.label_counts(), counts)
    want = label_features(data.features.take(rows), data.labels.take(rows), dim=16, seed=0)
    assert np.array_equal(part.label_features(dim=16, seed=0), want)


def test_take_rows_of_token_ids_keeps_each_document():
    ids = np.array([1, 5, 2, 1, 7, 8, 9, 2, 1, 2], dtype=np.uint16)
    tokens = TokenIds(ids, np.array([0, 3, 8, 10]), pad_id=0)
    labels = CSR(np.array([0, 1, 2, 3]), np.array([2, 0, 1], dtype=np.int32), None, num_columns=3)
    data = TokenDataset(tokens, labels, num_classes=3, multilabel=False, vocab_size=10, texts=["a", "b", "c"])
    part = take_rows(data, np.array([2, 1]))
    assert part.texts == ["c", "b"] and part.label_counts().tolist() == [1, 1, 0]
    batch = part.batch(np.array([0, 1]))
    assert batch.inputs.input_ids.tolist() == [[1, 2, 0, 0, 0], [1, 7, 8, 9, 2]]
    assert batch.targets.tolist() == [1, 0]


def test_label_prior_share_counts_the_most_frequent_label_only_when_it_is_rare():
    counts = np.array([5, 40, 10])
    assert label_prior_share(np.array([1, 1, 1, 0]), counts, 100) == 0.75
    assert label_prior_share(np.array([1, 1]), counts, 60) == 0.0  # label 1 on 2/3 of the rows: a fair guess


_TINY = [
    "model.hidden=[32]",
    "model.dropout=0.1",
    "optim.encoder.lr=0.01",
    "optim.head.lr=0.01",
    "train.batch_size=32",
    "train.progress=false",
    "train.valid_fraction=0.1",
    "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def data(deb_tags_slice):
    return deb_tags_slice(200, 50)


def _train(data, out, *extra, epochs=4):
    train, test = data
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", str(epochs)]
    return main([*argv, "--set", *_TINY, *extra])


def _records(out, kind):
    with open(out / "log.jsonl") as file:
        return [record for record in map(json.loads, file) if record["kind"] == kind]


def _json(path):
    with open(path) as file:
        return json.load(file)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("valid") / "run"
    assert _train(data, out) == 0
    return out


def _kept_by_the_rule(valid, rows, within=1.0):
    """The epoch kept: the latest whose P@1 is within ``within`` standard errors of the top P@1 so far."""
    kept, top = None, -1.0
    for record in valid:
        top = max(top, record["P@1"])
        if record["P@1"] >= top - within * math.sqrt(top * (1 - top) / rows):
            kept = record
    return kept


def _tracker(rows, within=1.0, state=None):
    """A trainer reduced to what picks the epoch: ``rows`` validation rows, ``train.keep_within_se``, and
    the epochs whose weights it would write."""
    trainer = Trainer.__new__(Trainer)
    trainer.config = SimpleNamespace(
        train=SimpleNamespace(keep_within_se=within), eval=SimpleNamespace(ks=(1,))
    )
    trainer.valid_data, trainer.state, trainer.saved = [None] * rows, state or LoopState(), []
    trainer._save_best = trainer.saved.append
    return trainer


@pytest.mark.parametrize(
    ("scores", "rows", "within", "saved", "kept", "top", "since"),
    [
        ([0.5, 0.8, 0.75, 0.6], 20, 1.0, [1, 2, 3], 3, 2, 2),  # 0.75 within 0.089 of 0.8; 0.6 is not
        ([0.5, 0.8, 0.75, 0.6], 20, 0.0, [1, 2], 2, 2, 2),  # the best epoch itself
        ([0.5, 0.8, 0.75, 0.6], 20, 3.0, [1, 2, 3, 4], 4, 2, 2),  # 0.6 within 0.268 of 0.8
        ([0.80, 0.79], 10_000, 1.0, [1], 1, 1, 1),  # 10,000 rows tell 0.01 apart (0.004)
        ([0.7, 0.7, 0.7], 20, 0.0, [1, 2, 3], 3, 1, 2),  # equal scores: the later
        ([0.6, 0.7, 0.9], 20, 1.0, [1, 2, 3], 3, 3, 0),
    ],
)
def test_the_epoch_kept_is_the_latest_within_the_noise_of_the_best(
    scores, rows, within, saved, kept, top, since
):
    trainer = _tracker(rows, within)
    for epoch, score in enumerate(scores, 1):
        trainer._track_best(epoch, {"P@1": score})
    state = trainer.state
    assert trainer.saved == saved and (state.best_epoch, state.best_score) == (kept, scores[kept - 1])
    assert (state.top_epoch, state.top_score, state.evals_since_best) == (top, scores[top - 1], since)


def test_the_run_says_which_epoch_it_kept_and_the_best_one_it_passed_over():
    trainer = _tracker(20)
    for epoch, score in enumerate([0.5, 0.8, 0.75], 1):
        trainer._track_best(epoch, {"P@1": score})
    assert trainer._kept_line() == (
        "kept epoch 3: validation P@1 0.7500, within 1 standard error (0.0894) of epoch 2's 0.8000 "
        "(train.keep_within_se)"
    )
    trainer._track_best(4, {"P@1": 0.9})
    assert trainer._kept_line() == "kept epoch 4: validation P@1 0.9000"


def test_a_checkpoint_without_a_top_score_counts_its_kept_epoch_as_the_top():
    trainer = _tracker(20, state=LoopState(best_epoch=2, best_score=0.8, evals_since_best=0))
    trainer._track_best(3, {"P@1": 0.75})
    state = trainer.state
    assert trainer.saved == [3] and (state.best_epoch, state.top_epoch, state.top_score) == (3, 2, 0.8)
    assert state.evals_since_best == 1


def test_the_epoch_kept_is_by_the_rule_on_validation_and_the_test_is_scored_with_it(run):
    valid, curve = _records(run, "eval_valid"), _records(run, "eval_test_curve")
    assert [r["epoch"] for r in valid] == [r["epoch"] for r in curve] == [1, 2, 3, 4]
    assert not _records(run, "eval")
    best = _kept_by_the_rule(valid, rows=20)
    metrics = _json(run / "metrics.json")
    assert metrics["epoch_kept"] == best["epoch"] and metrics["valid_P@1"] == best["P@1"]
    (final,) = _records(run, "eval_test")
    kept_curve = curve[best["epoch"] - 1]
    for key in ("P@1", "P@5", "nDCG@5", "PSP@5"):
        assert metrics[key] == final[key] == kept_curve[key], key  # the same weights, scored once more
    assert (run / "best" / f"epoch-{best['epoch']}").is_dir() and len(list((run / "best").iterdir())) == 1
    kept, model = read_state(str(run / "best" / f"epoch-{best['epoch']}")), read_state(str(run / "model"))
    for part in ("encoder", "head"):
        for name, tensor in kept[part].items():
            assert torch.equal(tensor, model[part][name]), name
    for file in (run / "model").iterdir():  # the kept weights' files, linked: written once
        assert file.stat().st_ino == (run / "best" / f"epoch-{best['epoch']}" / file.name).stat().st_ino
    facts = _json(run / "run.json")
    assert (facts["num_train_samples"], facts["num_valid_samples"]) == (180, 20)
    assert "valid P@1" in (run / "report.md").read_text()


def test_the_kept_weights_survive_a_kill_and_resume(data, run, tmp_path):
    out = tmp_path / "resumed"
    assert _train(data, out, "--set", "train.stop_after_steps=16") == 0  # mid-epoch 3 (6 steps an epoch)
    assert not (out / "metrics.json").exists() and (out / "best").is_dir()
    assert _train(data, out, "--resume") == 0
    resumed, full = _json(out / "metrics.json"), _json(run / "metrics.json")
    (kept_curve,) = [r for r in _records(out, "eval_test_curve") if r["epoch"] == resumed["epoch_kept"]]
    for key in ("P@1", "P@5", "nDCG@5", "PSP@5"):
        assert resumed[key] == kept_curve[key], key
    if not torch.cuda.is_available():  # a GPU's atomic adds make two runs differ in the last bits
        assert {k: v for k, v in resumed.items() if "@" in k or k == "epoch_kept"} == {
            k: v for k, v in full.items() if "@" in k or k == "epoch_kept"
        }


def test_a_best_last_epoch_is_kept_without_reading_it_back_or_scoring_it_twice(data, tmp_path, monkeypatch):
    def no_reads(folder):
        raise AssertionError(f"read {folder}: the modules hold the last epoch's weights")

    monkeypatch.setattr("megaclass.train.loop.load_run_weights", no_reads)
    scored, evaluate = [], Trainer.evaluate

    def counted(self, dataset, **options):
        scored.append(dataset)
        return evaluate(self, dataset, **options)

    monkeypatch.setattr(Trainer, "evaluate", counted)
    out = tmp_path / "one-epoch"
    assert _train(data, out, epochs=1) == 0
    metrics = _json(out / "metrics.json")
    assert metrics["epoch_kept"] == 1 and len(scored) == 2  # the validation rows and the test file, once each
    (curve,) = _records(out, "eval_test_curve")
    assert all(metrics[key] == curve[key] for key in ("P@1", "P@5", "nDCG@5", "PSP@5"))
    kept, model = read_state(str(out / "best" / "epoch-1")), read_state(str(out / "model"))
    for part in ("encoder", "head"):
        for name, tensor in kept[part].items():
            assert torch.equal(tensor, model[part][name]), name


def test_patience_stops_after_evaluations_without_improvement(data, tmp_path, capsys):
    out = tmp_path / "patience"
    frozen = ["optim.encoder.lr=0", "optim.head.lr=0", "train.patience=2"]
    assert _train(data, out, "--set", *frozen, epochs=6) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kept epoch")]
    assert line.startswith("kept epoch 3: validation P@1 ") and "standard error" not in line
    metrics = _json(out / "metrics.json")
    assert metrics["epochs"] == 3 and metrics["epoch_kept"] == 3  # epochs 2 and 3 score the same: the later
    assert len(_records(out, "eval_valid")) == 3


def test_a_validation_file_replaces_the_split(data, tmp_path):
    train, test = data
    out = tmp_path / "file"
    assert _train(data, out, "--valid", test, epochs=1) == 0
    facts = _json(out / "run.json")
    assert (facts["num_train_samples"], facts["num_valid_samples"]) == (200, 50)
    assert facts["valid_file"]["path"] == test
    assert _train(data, out, "--resume", epochs=1) == 2  # resumed without the run's validation file


def _uninformative(path, rows: int, seed: int) -> str:
    """One-label BoW rows whose inputs are all alike: label 0 on 40% of them, labels 1..9 on the rest."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(rows) < 0.4, 0, rng.integers(1, 10, rows))
    with open(path, "w") as file:
        file.write(f"{rows} 4 10\n")
        file.writelines(f"{label} 0:1.0 2:0.5\n" for label in labels)
    return str(path)


def test_a_run_at_the_label_prior_stops_with_one_line(tmp_path, capsys):
    train, test = _uninformative(tmp_path / "train.txt", 600, 0), _uninformative(tmp_path / "test.txt", 50, 1)
    out = tmp_path / "prior"
    argv = ["train", "--train", train, "--test", test, "--out", str(out), "--epochs", "3"]
    assert main([*argv, "--set", *_TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "training ended at the label prior" in error
    assert "label 0" in error and "optim.encoder.lr" in error and "warmup_fraction" in error
    assert "transformer" not in error  # advice for the run's own encoder
    assert not (out / "metrics.json").exists()
    # a run warmed up longer is not told to warm up shorter
    assert main([*argv, "--overwrite", "--set", *_TINY, "optim.warmup_fraction=0.3"]) == 2
    error = capsys.readouterr().err.strip()
    assert "warmup_fraction" not in error and "train.epochs (now 3)" in error


def test_a_selected_heads_row_average_resumes_exactly(data, tmp_path):
    """A run with a weight average stopped inside its first epoch and resumed keeps and scores the same
    averaged rows as the run that was not stopped, to float32 rounding (the rows' average is brought up to
    the checkpoint's step to be saved, which the other run did later, in one product); the average does not
    change training (its index searched for evaluation included)."""
    plain = ["--head", "selected", "--set", "head.sample_num=40", "head.index=gpu", "head.topk_search=index"]
    settings = [*plain, "train.ema_decay=0.9"]
    whole, resumed, unaveraged = tmp_path / "whole", tmp_path / "resumed", tmp_path / "unaveraged"
    assert _train(data, whole, *settings, epochs=2) == 0
    assert _train(data, unaveraged, *plain, epochs=2) == 0
    losses = [[r["losses"] for r in _records(run, "train")] for run in (whole, unaveraged)]
    assert losses[0] == losses[1]
    assert _train(data, resumed, *settings, "train.stop_after_steps=4", epochs=2) == 0
    assert _train(data, resumed, "--resume", *settings, epochs=2) == 0
    kept = [read_state(str(run / "model"))["head"]["store.weight"] for run in (whole, resumed)]
    torch.testing.assert_close(*kept, rtol=0, atol=1e-6)
    assert _json(whole / "metrics.json")["P@1"] == _json(resumed / "metrics.json")["P@1"]


def test_a_selected_heads_kept_weights_are_its_rows_alone(data, tmp_path, capsys):
    """The kept and final weights of a selected head hold its rows, not their optimizer state, the selection's
    state or the index (a checkpoint holds those); with a weight average, the rows' average (a checkpoint
    holds both); read back at the end, they score as at their epoch's end, and ``eval`` of the run scores as
    the run did."""
    out = tmp_path / "selected"
    settings = ["--head", "selected", "--set", "head.sample_num=40", "head.index=gpu", "train.ema_decay=0.5"]
    assert _train(data, out, *settings, epochs=2) == 0
    assert "the encoder and the head are evaluated and kept averaged" in capsys.readouterr().out
    metrics = _json(out / "metrics.json")
    (kept_curve,) = [r for r in _records(out, "eval_test_curve") if r["epoch"] == metrics["epoch_kept"]]
    assert metrics["P@1"] == kept_curve["P@1"]
    kept = read_state(str(out / "model"))
    assert set(kept["head"]) == {"store.weight"}
    checkpoints = [read_state(str(path)) for path in sorted((out / "checkpoints").glob("step_*"))]
    (at_kept,) = [c for c in checkpoints if c["loop"]["epoch"] == metrics["epoch_kept"]]
    assert {"store.weight", "store.optim.momentum_buffer", "selection.rng"} <= set(at_kept["head"])
    assert torch.equal(kept["head"]["store.weight"], at_kept["average"]["head.store.weight"])
    assert not torch.equal(kept["head"]["store.weight"], at_kept["head"]["store.weight"])
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--test", data[1]]) == 0
    assert json.loads(capsys.readouterr().out)["P@1"] == pytest.approx(metrics["P@1"], abs=1e-6)
