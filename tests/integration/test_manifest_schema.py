"""The JSON Schema in manifests/ and the C manifest reader agree: every
shipped manifest is valid for both, and bad ones are refused by both."""
import json
import os
import subprocess

import jsonschema
import pytest

from conftest import BUILD, MANIFESTS, REPO

SCHEMA = os.path.join(REPO, "manifests", "rpcplugin-manifest.schema.json")


@pytest.fixture(scope="module")
def validator():
    with open(SCHEMA) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=os.path.basename)
def test_shipped_manifests_valid(validator, manifest):
    with open(manifest) as f:
        validator.validate(json.load(f))


BASE = {"manifest_version": 1, "name": "t", "module": "rpcplugin_services.so",
        "abi_version": "1.0", "protocol_version": 1,
        "services": ["plugin.GRPCStdio"]}

BAD = [
    dict(BASE, extra=1),
    dict(BASE, services=[]),
    dict(BASE, services=["plugin..Nope"]),
    dict(BASE, services=["plugin.GRPCStdio", "proto.KV"]),
    dict(BASE, infrastructure="host.json"),
    dict(BASE, abi_version="1"),
    dict(BASE, protocol_version=2),
    dict(BASE, config={"stdio": {"overflow": "spill"}}),
    dict(BASE, config={"stdio": {"queue_bytes": 10}}),
    dict(BASE, config={"broker": {"networks": ["udp"]}}),
    dict(BASE, config={"unknown": {}}),
]


APP = {"manifest_version": 1, "name": "kv", "module": "kv.so",
       "abi_version": "1.1", "protocol_version": 1, "services": ["proto.KV"],
       "infrastructure": "host.json", "config": {"anything": [1]}}


def test_application_manifest_valid(validator):
    validator.validate(APP)
    validator.validate({k: v for k, v in APP.items() if k != "infrastructure"})


@pytest.mark.parametrize("doc", BAD, ids=range(len(BAD)))
def test_bad_manifests_refused_by_both(validator, tmp_path, doc):
    assert list(validator.iter_errors(doc)), "schema accepted %r" % doc
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    env = dict(os.environ, RPCPLUGIN_MODULE_PATH=os.path.join(BUILD, "lib"))
    p = subprocess.run([os.path.join(BUILD, "tests", "test_host"), str(path),
                        "unix:" + str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1, p
    assert str(path) in p.stderr
    assert "field" in p.stderr or "services" in p.stderr, p.stderr
