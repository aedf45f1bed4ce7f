"""Launch small worlds of gloo ranks on the CPU, each rank a fresh process, with a timeout on the whole."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def launch(scenario: str, out_dir: str, *args: str, world_size: int = 2, timeout_s: float = 120.0) -> World:
    """Run ``_worker.py scenario out_dir args`` as ranks ``0..world_size-1``; kill them all past the timeout."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if world_size == 1:
            for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(name)
        processes.append(
            subprocess.Popen(
                [sys.executable, WORKER, scenario, out_dir, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    codes, errors = [], []
    try:
        for process in processes:
            _, err = process.communicate(timeout=timeout_s)
            codes.append(process.returncode)
            errors.append(err)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.json")
        results.append(json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {})
    return World(codes, errors, results)


@pytest.fixture(scope="session")
def head_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """One world of 2 ranks that checks every sharded head against the plain head."""
    world = launch("heads", str(tmp_path_factory.mktemp("heads")))
    assert world.codes == [0, 0], "\n".join(world.stderr)
    return world
