#!/bin/sh
# tests/crowdsec/setup.sh — install Debian 12's crowdsec (binary package only)
# so that it works offline, and python3-grpcio for the reference notifier.
#
# Idempotent; prints what it does. Needs root (or sudo) and the Debian mirror.
#
# Why the credentials file: crowdsec's postinst registers to the Central
# API (online) when /etc/crowdsec/online_api_credentials.yaml is missing or
# EMPTY (`[ ! -s "$CAPI" ]` then `cscli capi register`), which fails
# offline and makes the install fail. A NON-EMPTY file (a comment is enough,
# as README.Debian says) skips the registration; the package never removes
# it, even on purge. The local machine registration the postinst also does
# (`cscli machines add`) is offline-safe (sqlite under /var/lib/crowdsec).
# No service is started (no systemd here); the test harness runs crowdsec
# itself on a private configuration.
set -eu

SUDO=
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "setup.sh: need root or sudo" >&2; exit 1; fi
fi

CAPI=/etc/crowdsec/online_api_credentials.yaml
PKGS="crowdsec python3-grpcio"

if [ -s "$CAPI" ]; then
    echo "setup.sh: $CAPI exists and is not empty: CAPI registration will be skipped"
else
    echo "setup.sh: creating $CAPI (a comment only) so that crowdsec's postinst skips the online CAPI registration"
    $SUDO mkdir -p /etc/crowdsec
    printf '%s\n' "# no thanks: offline test machine, no Central API registration (see /usr/share/doc/crowdsec/README.Debian)" \
        | $SUDO tee "$CAPI" >/dev/null
fi

missing=
for p in $PKGS; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        echo "setup.sh: $p already installed ($(dpkg-query -W -f='${Version}' "$p"))"
    else
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    echo "setup.sh: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet.
    # shellcheck disable=SC2086
    if ! $SUDO apt-get install -y --no-install-recommends $missing; then
        echo "setup.sh: install failed, running apt-get update and retrying"
        $SUDO apt-get update
        # shellcheck disable=SC2086
        $SUDO apt-get install -y --no-install-recommends $missing
    fi
fi

# A half-configured package (e.g. an earlier install that failed in postinst
# before the credentials file existed) is finished here.
if dpkg-query -W -f='${Status}' crowdsec 2>/dev/null | grep -q 'half-configured\|unpacked'; then
    echo "setup.sh: crowdsec is not fully configured, running dpkg --configure crowdsec"
    $SUDO dpkg --configure crowdsec
fi

for b in /usr/bin/crowdsec /usr/bin/cscli /usr/bin/python3; do
    [ -x "$b" ] || { echo "setup.sh: $b missing after install" >&2; exit 1; }
done
/usr/bin/python3 -c 'import grpc' || { echo "setup.sh: /usr/bin/python3 cannot import grpc" >&2; exit 1; }
echo "setup.sh: ready: crowdsec $(crowdsec -version 2>&1 | sed -n "s/.*version: //p" | head -n 1)"
