#!/bin/sh
# Build the Go interop programs (gpclient, gpserver; gpkv, gpkvplugin,
# gpcounter, gpcounterplugin for go-plugin's examples; gpreflect, a server
# reflection client; gpmux, a client with go-plugin >= 1.6's gRPC broker
# multiplexing, and gpmuxplugin, a fake multiplexing plugin for its
# self-test) into OUTDIR/bin, in
# GOPATH mode against Debian's packaged Go libraries (go-plugin v1.0.1 and
# friends under /usr/share/gocode).  No network, no module proxy.
# Idempotent: the Go build cache lives in OUTDIR/gocache, so a second run
# only relinks what changed.  The tests take RP_GO_BIN=OUTDIR/bin.
#
#   tests/go/build.sh OUTDIR
set -eu

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi

HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SYSGOPATH=${RP_SYSTEM_GOPATH:-/usr/share/gocode}

GO=${GO:-go}
if ! command -v "$GO" >/dev/null 2>&1; then
  echo "$0: no Go toolchain ('$GO' not found; Debian: apt-get install golang-go)" >&2
  exit 1
fi

# Everything go-plugin v1.0.1 and the programs import, with the Debian
# package that ships it, so that a missing one is named, not guessed.
missing=
for pkg in \
  github.com/hashicorp/go-plugin:golang-github-hashicorp-go-plugin-dev \
  github.com/hashicorp/go-hclog:golang-github-hashicorp-go-hclog-dev \
  github.com/hashicorp/yamux:golang-github-hashicorp-yamux-dev \
  github.com/mitchellh/go-testing-interface:golang-github-mitchellh-go-testing-interface-dev \
  github.com/oklog/run:golang-github-oklog-run-dev \
  github.com/golang/protobuf/proto:golang-github-golang-protobuf-1-5-dev \
  google.golang.org/protobuf/encoding/protowire:golang-google-protobuf-dev \
  google.golang.org/grpc:golang-google-grpc-dev \
  google.golang.org/genproto/googleapis/rpc/status:golang-google-genproto-dev \
  golang.org/x/net/context:golang-golang-x-net-dev \
  golang.org/x/sys/unix:golang-golang-x-sys-dev \
  golang.org/x/text/unicode/bidi:golang-golang-x-text-dev \
  github.com/fatih/color:golang-github-fatih-color-dev \
  github.com/mattn/go-isatty:golang-github-mattn-go-isatty-dev \
  github.com/mattn/go-colorable:golang-github-mattn-go-colorable-dev
do
  path=${pkg%%:*}
  deb=${pkg#*:}
  if [ ! -d "$SYSGOPATH/src/$path" ]; then
    missing="$missing $deb"
    echo "$0: missing Go package $path (Debian package $deb)" >&2
  fi
done
if [ -n "$missing" ]; then
  echo "$0: install with: apt-get install$missing" >&2
  exit 1
fi

# GOPATH mode: our sources are $HERE/src/rpcplugin-interop/...
export GO111MODULE=off
export GOPATH="$HERE:$SYSGOPATH"
export GOCACHE="$OUT/gocache"
export GOFLAGS=
export GOPROXY=off
export GOTOOLCHAIN=local
export CGO_ENABLED=0

mkdir -p "$OUT/bin"
cd "$HERE/src/rpcplugin-interop"
"$GO" vet ./...
PROGS="gpclient gpserver gpkv gpkvplugin gpcounter gpcounterplugin gpreflect gpmux gpmuxplugin gpmuxbench"
for prog in $PROGS; do
  "$GO" build -o "$OUT/bin/$prog.tmp" "./$prog"
  mv -f "$OUT/bin/$prog.tmp" "$OUT/bin/$prog"
done
echo "$0: built in $OUT/bin: $PROGS"
