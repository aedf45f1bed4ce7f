"""The second-language example of docs/paramserver.md runs against a real shard (when Node.js can)."""

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from megaclass.paramserver import HyperParams, wire


def _node_with_grpc() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    probe = subprocess.run(
        [node, "-e", "require.resolve('@grpc/grpc-js'); require.resolve('@grpc/proto-loader')"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("@grpc/grpc-js and @grpc/proto-loader not found (set NODE_PATH)")
    return node


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_node_example_pulls_and_pushes(shards, repo_root, tmp_path, token):
    node = _node_with_grpc()
    text = open(os.path.join(repo_root, "docs", "paramserver.md")).read()
    script = tmp_path / "ps_example.js"
    script.write_text(re.search(r"```js\n(.*?)```", text, re.S).group(1))
    proto = tmp_path / "megaclass.proto"
    proto.write_text(wire.proto_text())
    (server,) = shards(1, num_rows=6, dim=3, token=token, hyper=HyperParams(momentum=0.9))
    command = [node, str(script), str(proto), f"127.0.0.1:{server.port}", *([token] if token else [])]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    before, after = torch.tensor(result["before"]), torch.tensor(result["after"])
    assert result["step"] == 1 and before.shape == (2, 3)
    torch.testing.assert_close(after, before - 0.1)  # first SGD step: the momentum buffer is the gradient
    if token:
        bad = subprocess.run(command[:-1] + ["wrong"], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "UNAUTHENTICATED" in bad.stderr
