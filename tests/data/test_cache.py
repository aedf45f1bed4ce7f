"""Stamped ``.npz`` caches: the first matching candidate is read, the first writable folder written."""

import doctest
import os

import numpy as np
import pytest

from megaclass.data import cache
from megaclass.data.cache import cache_dir, read_cache, write_cache


def test_round_trip_keeps_every_array(tmp_path):
    arrays = {"stamp": np.array([3, 7]), "ids": np.arange(5, dtype=np.int32), "values": np.ones((2, 3))}
    written = write_cache([tmp_path / "a.npz"], arrays)
    assert written == tmp_path / "a.npz"
    assert oct(os.stat(written).st_mode & 0o777) == oct(0o644)  # readable by others, as any data file
    loaded = read_cache([written], "stamp", np.array([3, 7]))
    assert loaded is not None and sorted(loaded) == sorted(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.npz")]  # no temporary left behind


def test_stale_missing_and_corrupt_caches_are_misses(tmp_path):
    good = tmp_path / "good.npz"
    write_cache([good], {"stamp": np.array([1]), "ids": np.arange(2)})
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not an archive")
    unstamped = tmp_path / "unstamped.npz"
    write_cache([unstamped], {"ids": np.arange(2)})
    assert read_cache([good], "stamp", np.array([2])) is None  # the source changed
    assert read_cache([tmp_path / "missing.npz", corrupt, unstamped], "stamp", np.array([1])) is None
    found = read_cache([corrupt, unstamped, good], "stamp", np.array([1]))  # the first that matches
    assert found is not None
    np.testing.assert_array_equal(found["ids"], np.arange(2))


def test_read_only_folder_falls_back_to_the_next_candidate(tmp_path):
    locked, spare = tmp_path / "locked", tmp_path / "spare"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        written = write_cache([locked / "c.npz", spare / "c.npz"], {"stamp": np.array([1])})
    finally:
        locked.chmod(0o755)
    assert written == spare / "c.npz" and written.is_file()  # the missing folder was created
    assert not (locked / "c.npz").exists()


def test_nowhere_to_write_returns_none(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert write_cache([blocker / "sub" / "c.npz"], {"stamp": np.array([1])}) is None


@pytest.mark.parametrize("value", ["", None])
def test_cache_dir_defaults_to_the_home_cache(monkeypatch, tmp_path, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("MEGACLASS_CACHE", raising=False)
    else:
        monkeypatch.setenv("MEGACLASS_CACHE", value)
    assert cache_dir() == tmp_path / ".cache" / "megaclass"
    monkeypatch.setenv("MEGACLASS_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_module_example_runs():
    result = doctest.testmod(cache)
    assert result.attempted > 0 and result.failed == 0
