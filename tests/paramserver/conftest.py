"""Parameter-server test helpers: shards in this process (fast) or as real ``megaclass`` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("grpc")

from megaclass.paramserver import HyperParams, ServerConfig, serve  # noqa: E402


@pytest.fixture
def shards(tmp_path) -> Iterator:
    """``start(shards, **config)`` -> list of running in-process shards (stopped after the test)."""
    running = []

    def start(count: int = 1, *, num_rows: int = 29, dim: int = 5, **options):
        hyper = options.pop("hyper", HyperParams(lr=0.1, momentum=0.0))
        group = [
            serve(
                ServerConfig(
                    num_rows=num_rows,
                    dim=dim,
                    shard=i,
                    shards=count,
                    data_dir=str(tmp_path / f"shard{i}-{len(running)}"),
                    hyper=hyper,
                    **options,
                )
            )
            for i in range(count)
        ]
        running.extend(group)
        return group

    yield start
    for server in running:
        server.stop(0)


class ShardProcess:
    """``python -m megaclass paramserver serve ...`` in a child process."""

    def __init__(self, args: list[str], *, port: int = 0) -> None:
        self.args = args
        self.port = port
        self.process: subprocess.Popen | None = None
        self.log: tempfile._TemporaryFileWrapper | None = None

    def start(self, timeout_s: float = 60.0) -> ShardProcess:
        command = [
            sys.executable,
            "-m",
            "megaclass",
            "paramserver",
            "serve",
            *self.args,
            "--port",
            str(self.port),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # output to a file, not a pipe nobody reads after start (a full pipe would block the server)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="shard-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            match = re.search(r"listening on \S+:(\d+)", open(self.log.name).read())
            if match:
                self.port = int(match.group(1))
                return self
            time.sleep(0.05)
        output = open(self.log.name).read()
        self.kill()
        raise RuntimeError("shard did not start:\n" + output)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if self.log is not None:
            self.log.close()
            os.unlink(self.log.name)
            self.log = None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Wait for a terminated process (killing it after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture
def processes() -> Iterator:
    """``start(args)`` -> a started :class:`ShardProcess`; every one is killed after the test."""
    started: list[ShardProcess] = []

    def start(args: list[str], *, port: int = 0) -> ShardProcess:
        shard = ShardProcess(args, port=port)
        started.append(shard)
        return shard.start()

    yield start
    for shard in started:
        shard.terminate()  # all at once, then wait for each
    for shard in started:
        shard.stop()
