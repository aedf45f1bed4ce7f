"""Tests mirror ``src/megaclass``: every module has ``tests/<package>/test_<module>.py``; an op package
``ops/<op>/`` is mirrored by one ``tests/ops/test_<op>.py``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "megaclass"

# Packages whose layout other suites own, and modules tested through another file (each says which).
NOT_MIRRORED = {
    "heads",
    "train",
    "distributed",
    "paramserver/client.py",  # client, server, state and config run together against live shards:
    "paramserver/server.py",  # tests/paramserver/test_updates.py, test_faults.py, test_untrusted.py,
    # test_index.py
    "paramserver/config.py",
    "paramserver/updaters.py",  # tests/paramserver/test_updates.py against torch's optimizers
    "store/base.py",  # the RowStore interface; its stores' tests below exercise it
    "store/device.py",  # tests/store/test_stores.py: device and host stores against one reference
    "store/host.py",
    "store/paramserver.py",  # tests/paramserver/test_updates.py: the store over live shards
}


def mirror(module: Path) -> Path:
    """The test file that mirrors ``module`` (a path relative to ``src/megaclass``)."""
    if module.parts[0] == "ops" and len(module.parts) == 3:  # ops/<op>/<part>.py: one file per op
        return Path("tests", "ops", f"test_{module.parts[1]}.py")
    return Path("tests", *module.parts[:-1], f"test_{module.stem}.py")


def unmirrored() -> list[str]:
    missing = []
    for path in sorted(SOURCE.rglob("*.py")):
        module = path.relative_to(SOURCE)
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if module.parts[0] in NOT_MIRRORED or module.as_posix() in NOT_MIRRORED:
            continue
        if not (ROOT / mirror(module)).is_file():
            missing.append(f"{module.as_posix()} -> {mirror(module).as_posix()}")
    return missing


def test_every_module_has_a_mirrored_test():
    assert unmirrored() == [], "modules without a mirrored test file"


def test_allow_list_names_only_what_exists_and_lacks_a_mirror():
    for name in NOT_MIRRORED:
        assert (SOURCE / name).exists(), f"{name} is allowed but gone"
        if name.endswith(".py"):
            assert not (ROOT / mirror(Path(name))).is_file(), f"{name} has its mirror now: drop it"


def test_mirror_paths():
    assert mirror(Path("data", "xmc.py")) == Path("tests", "data", "test_xmc.py")
    assert mirror(Path("ops", "fixed_fanin", "kernels.py")) == Path("tests", "ops", "test_fixed_fanin.py")
    assert mirror(Path("targets.py")) == Path("tests", "test_targets.py")
