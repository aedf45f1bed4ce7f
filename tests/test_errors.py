"""Errors on bad input: file and line in the message, one-line forms for the command line."""

import pytest

from megaclass.errors import DataFormatError, TrainingDiverged, one_line


@pytest.mark.parametrize(
    "line, expected", [(3, "data/train.txt:3: bad header"), (None, "data/train.txt: bad header")]
)
def test_data_format_error_names_file_and_line(tmp_path, line, expected):
    error = DataFormatError("data/train.txt", "bad header", line=line)
    assert str(error) == expected and isinstance(error, ValueError)
    assert (error.path, error.line, error.problem) == ("data/train.txt", line, "bad header")


def test_data_format_error_takes_path_objects(tmp_path):
    assert DataFormatError(tmp_path / "x.bin", "short").path == str(tmp_path / "x.bin")


@pytest.mark.parametrize(
    "error, expected",
    [
        (ValueError("bad value\n  in line 3\n\n"), "bad value; in line 3"),
        (KeyError("k"), "'k'"),
        (RuntimeError(), "RuntimeError"),
        (TrainingDiverged("loss is nan at step 7"), "loss is nan at step 7"),
    ],
)
def test_one_line_joins_the_message(error, expected):
    assert one_line(error) == expected
