"""``megaclass verify --features``: a features file that is not a ``.npy`` of float rows, one per image of the
``.bin``, is refused in one line naming it (never with NumPy's advice to load pickles)."""

import numpy as np
import pytest

from megaclass.cli import main
from megaclass.train.extract import verify


def _write(path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("0.1 0.2 0.3\n")
    elif kind == "objects":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "integers":
        np.save(path, np.ones((120, 4), dtype=np.int64))
    elif kind == "cut short":
        np.save(path, np.ones((120, 4), dtype=np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "nan":
        values = np.ones((120, 4), dtype=np.float32)
        values[[7, 9], 2] = [np.nan, np.inf]
        np.save(path, values)
    elif kind == "folder":
        path.mkdir()


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("empty", "an empty file"),
        ("text", "not a .npy file"),
        ("objects", "cut short, damaged or holding objects"),
        ("cut short", "cut short, damaged or holding objects"),
        ("integers", "values of type int64"),
        ("nan", "row 7 (image 8 of {data}) holds NaN or infinite values, and 2 rows in all"),
        ("folder", "is a folder"),
        ("missing", "no such file"),
    ],
)
def test_features_that_are_no_float_npy_are_refused_in_one_line(tmp_path, fixture_bin, capsys, kind, problem):
    features = tmp_path / "feats.npy"
    _write(features, kind)
    capsys.readouterr()
    assert main(["verify", "--data", fixture_bin, "--features", str(features)]) == 2
    error = capsys.readouterr().err
    expected = (
        f"expected a .npy of float features, shape (120, D): one row per image of {fixture_bin}, as "
        "megaclass extract writes"
    )
    problem = problem.format(data=fixture_bin)
    assert error == f"megaclass verify: error: --features {features}: {problem}: {expected}\n"
    assert "allow_pickle" not in error


def test_float_features_of_every_image_are_scored(tmp_path, fixture_bin):
    features = tmp_path / "feats.npy"
    np.save(features, np.random.default_rng(0).normal(size=(120, 8)).astype(np.float32))
    result = verify(fixture_bin, features=features)
    assert 0.0 <= result.accuracy <= 1.0
