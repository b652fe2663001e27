#!/usr/bin/env bash
# The main job: build everything, then let a real go-plugin v1.0.1 client
# (tests/go gpclient) launch rpcplugin-host serving manifests/default.json
# with a demo child.  The client does go-plugin's handshake, Ping, starts
# the broker stream, reads the child's output through StreamStdio (v1.0.1
# has no stdio client: gpclient opens its own stream with the handshake's
# connection details), then Kill(): the host's graceful Shutdown path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
scripts/install-deps.sh test
echo "== building"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRPCPLUGIN_BENCH=OFF >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
tests/go/build.sh "$ROOT/build/go" >/dev/null
echo "== running: gpclient launch -- rpcplugin-host manifests/default.json -- scripts/demo-child.sh"
export TMPDIR=$(mktemp -d)
trap 'rm -rf "$TMPDIR"' EXIT
RPCPLUGIN_MODULE_PATH="$ROOT/build/lib" \
  build/go/bin/gpclient launch --stdio --stdio-print --stdio-expect-lines 6 \
    --timeout 20s -- \
    build/bin/rpcplugin-host --magic-cookie RPCPLUGIN_INTEROP_COOKIE=rpcplugin-interop \
      manifests/default.json -- scripts/demo-child.sh
