"""rpcplugin-host with a third, independent client: Node's @grpc/grpc-js
(tests/node/host_client.js): handshake, Health/Check, a StreamStdio read of
a child's output, Shutdown, the stream's OK end and the host's exit 0.

Environment: RP_NODE_DIR, the tests/node folder after `npm install` there
(tests/run.sh does both); the tests are skipped only when it is unset.
"""
import os
import shutil
import subprocess

import pytest

from conftest import BUILD, REPO, SLOW
from hostutil import HOST_BIN, HOST_MANIFEST

NODE_DIR = os.environ.get("RP_NODE_DIR")
pytestmark = pytest.mark.skipif(
    not NODE_DIR,
    reason="RP_NODE_DIR is not set: run `npm install` in tests/node and set "
           "RP_NODE_DIR to that folder")


@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_node_client(network):
    node = shutil.which("node")
    assert node, "node is not installed"
    script = os.path.join(NODE_DIR, "host_client.js")
    assert os.path.isdir(os.path.join(NODE_DIR, "node_modules", "@grpc",
                                      "grpc-js")), \
        "run `npm install` in %s" % NODE_DIR
    r = subprocess.run(
        [node, script, "--host", HOST_BIN, "--manifest", HOST_MANIFEST,
         "--proto", os.path.join(REPO, "proto"), "--network", network,
         "--module-path", os.path.join(BUILD, "lib"),
         "--timeout", str(int(20 * SLOW))],
        capture_output=True, timeout=120 * SLOW)
    out = r.stdout.decode(errors="replace").splitlines()
    assert r.returncode == 0, (out, r.stderr.decode(errors="replace"))
    assert out[0].startswith("OK handshake 1|1|%s|" % network)
    assert out[1:] == ["OK health SERVING", "OK stdio", "OK shutdown",
                       "OK stream-end status=0", "OK exit 0"]
