"""Launch small worlds of gloo ranks on the CPU, each rank a fresh process, with a timeout on the whole."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class World:
    """Exit codes, outputs and per-rank JSON results of one launched world."""

    codes: list[int]
    stderr: list[str]
    results: list[dict]
    out_dir: str = ""


@dataclass
class Running:
    """The processes of a world being run."""

    processes: list[subprocess.Popen]
    out_dir: str
    timeout_s: float


def start(scenario: str, out_dir: str, *args: str, world_size: int = 2, timeout_s: float = 120.0) -> Running:
    """Start ``_worker.py scenario out_dir args`` as ranks ``0..world_size-1`` (size 1: no rank variables)."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks over gloo, also on a machine with one GPU
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        else:
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(name, None)
        command = [sys.executable, WORKER, scenario, out_dir, *args]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return Running(processes, out_dir, timeout_s)


def wait(running: Running) -> World:
    """Wait for every rank (killing those still running past the timeout) and read their results."""
    codes, errors = [], []
    deadline = time.monotonic() + running.timeout_s
    try:
        for process in running.processes:
            try:
                _, err = process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            codes.append(process.returncode)
            errors.append(err)
    finally:
        for process in running.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for rank in range(len(running.processes)):
        path = os.path.join(running.out_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                results.append(json.load(file))
        else:
            results.append({})
    return World(codes, errors, results, running.out_dir)


def port_taken(world: World) -> bool:
    """Whether a rank failed because another program took the free port between its choice and its use."""
    return any(code != 0 for code in world.codes) and any(
        "EADDRINUSE" in err or "address already in use" in err.lower() for err in world.stderr
    )


def launch(scenario: str, out_dir: str, *args: str, world_size: int = 2, timeout_s: float = 120.0) -> World:
    """:func:`start` then :func:`wait`; once more on a port taken meanwhile."""
    world = wait(start(scenario, out_dir, *args, world_size=world_size, timeout_s=timeout_s))
    if port_taken(world):
        world = wait(start(scenario, out_dir, *args, world_size=world_size, timeout_s=timeout_s))
    return world


def launch_all(scenario: str, launches: list[tuple[str, list[str], int]], *, timeout_s: float) -> None:
    """Run worlds ``(out_dir, args, world size)`` of one scenario side by side; each must exit cleanly (a
    world whose port was taken meanwhile runs again on its own)."""
    running = [
        start(scenario, out, *args, world_size=world, timeout_s=timeout_s) for out, args, world in launches
    ]
    for (out, args, world), process in zip(launches, running, strict=True):
        result = wait(process)
        if port_taken(result):
            result = launch(scenario, out, *args, world_size=world, timeout_s=timeout_s)
        assert not any(result.codes), "\n".join(result.stderr)


def write_bow_task(folder: str, seed: int) -> tuple[str, str]:
    """A small multi-label BoW task in the XMC repository format (29 labels, 40 features, 150 training and
    40 test rows) under ``folder``: (train path, test path)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    paths = []
    for name, rows in (("train.txt", 150), ("test.txt", 40)):
        lines = [f"{rows} 40 29"]
        for _ in range(rows):
            labels = ",".join(str(x) for x in sorted(rng.choice(29, rng.integers(1, 4), replace=False)))
            columns = sorted(rng.choice(40, 5, replace=False))
            lines.append(labels + " " + " ".join(f"{c}:{rng.random():.4f}" for c in columns))
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="session")
def head_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One world of 2 ranks that checks every sharded head against the plain head, and saves a checkpoint of
    each (``checkpoint-<head>`` beside ``world.out_dir``) after one step."""
    out_dir = str(tmp_path_factory.mktemp("worlds") / "heads")
    os.makedirs(out_dir)
    world = launch("heads", out_dir)
    assert world.codes == [0, 0], "\n".join(world.stderr)
    world.out_dir = out_dir
    return world


def exported_head(path: str, *, averaged: bool = False) -> dict:
    """:func:`~megaclass.distributed.checkpoint.export_head_state` of ``path``, read into tensors."""
    from megaclass.distributed.checkpoint import export_head_state
    from megaclass.state_io import RowSource

    state = export_head_state(path, averaged=averaged)
    return {key: value.read() if isinstance(value, RowSource) else value for key, value in state.items()}
