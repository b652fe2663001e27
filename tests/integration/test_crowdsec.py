"""examples/crowdsec-notifier inside a real product: Debian 12's own
crowdsec (1.4.6, built on go-plugin v1.0.1) launches the C notifier (a
plugin file that execs rpcplugin-host on the notifier's manifest, as user
nobody, with a fresh CROWDSEC_PLUGIN_KEY), configures it, delivers an alert
to it (appended to the file its notification config names), and stops it
(Shutdown, then the process must be gone within go-plugin's 2 s).

The harness is tests/crowdsec/run_notifier_test.sh (tests/crowdsec/README.md
says what it checks); crowdsec is installed by tests/crowdsec/setup.sh,
which the test command runs.  The build is staged with `cmake --install`
into a folder the harness copies where nobody can read it."""
import os
import shutil
import subprocess

import pytest

from conftest import BUILD, REPO, SLOW

HARNESS = os.path.join(REPO, "tests", "crowdsec", "run_notifier_test.sh")
EXAMPLE = os.path.join(BUILD, "examples", "crowdsec-notifier")

PLUGIN_FILE = """#!/bin/sh
exec "$CROWDSEC_HARNESS_SUPPORT/bin/rpcplugin-host" \\
  --magic-cookie CROWDSEC_PLUGIN_KEY \\
  "$CROWDSEC_HARNESS_SUPPORT/notifier/crowdsec-notifier.json"
"""


@pytest.mark.slow
def test_crowdsec_delivers_alert_to_c_notifier(tmp_path):
    assert shutil.which("crowdsec") and shutil.which("cscli"), (
        "crowdsec is not installed (tests/crowdsec/setup.sh installs it)")
    assert os.geteuid() == 0, "the harness runs as root"
    stage = tmp_path / "stage"
    subprocess.run(["cmake", "--install", BUILD, "--prefix", str(stage)],
                   check=True, capture_output=True, timeout=120)
    os.makedirs(stage / "notifier")
    for f in ("crowdsec-notifier.so", "crowdsec-notifier.json"):
        shutil.copy(os.path.join(EXAMPLE, f), stage / "notifier" / f)
    plugin = tmp_path / "notifier-plugin"
    plugin.write_text(PLUGIN_FILE)
    plugin.chmod(0o755)
    r = subprocess.run([HARNESS, "--support", str(stage), str(plugin),
                        "192.0.2.7"],
                       capture_output=True, text=True, timeout=300 * SLOW)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    last = [l for l in out.splitlines() if l.startswith(("PASS", "FAIL"))]
    assert last and last[-1].startswith("PASS"), out[-3000:]
    print(last[-1])
