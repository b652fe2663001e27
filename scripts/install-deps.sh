#!/usr/bin/env bash
# Install the Debian 12 packages the project needs, only those missing.
#   scripts/install-deps.sh [build|test|bench|package]   (default: test)
set -euo pipefail
what=${1:-test}
build_pkgs=(build-essential cmake pkg-config libgrpc-dev protobuf-c-compiler
  libprotobuf-c-dev libcjson-dev protobuf-compiler libprotobuf-dev libssl-dev)
test_pkgs=(python3-grpcio python3-protobuf python3-pytest python3-jsonschema
  python3-cryptography valgrind clang iproute2 util-linux
  libclang-rt-14-dev golang-go golang-github-hashicorp-go-plugin-dev
  golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev
  golang-google-protobuf-dev golang-google-genproto-dev
  golang-golang-x-net-dev nodejs npm dpkg-dev file groff-base)
bench_pkgs=(libgrpc++-dev g++ python3-matplotlib)
# scripts/package-check.sh: cpack -G DEB (dpkg-shlibdeps, file) and a fresh
# Debian root.
package_pkgs=(dpkg-dev file debootstrap)
pkgs=("${build_pkgs[@]}")
case "$what" in
  build) ;;
  test) pkgs+=("${test_pkgs[@]}") ;;
  bench) pkgs+=("${test_pkgs[@]}" "${bench_pkgs[@]}") ;;
  package) pkgs+=("${package_pkgs[@]}") ;;
  *) echo "usage: $0 [build|test|bench|package]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  # node and npm may come from elsewhere than Debian: accept the commands.
  if [ "$p" = nodejs ] && command -v node >/dev/null; then continue; fi
  if [ "$p" = npm ] && command -v npm >/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
