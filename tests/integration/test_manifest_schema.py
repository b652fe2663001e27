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


# ------------------------------------------------------- differential
#
# The same documents to the JSON Schema and to the C readers (librpcplugin's
# manifest reader, then, for the infrastructure services, the module's
# config reader: tests/manifest_check.c): seeded random mutations of a
# valid infrastructure and a valid application manifest, every field set
# to values of every type and to each side of every bound.  They must
# agree, except where the schema cannot say it: config.stdio.coalesce_bytes
# at most config.stdio.max_message_bytes is a rule between two fields.
DIFF_INFRA = {
    "$schema": "./rpcplugin-manifest.schema.json", "manifest_version": 1, "name": "t", "description": "d", "module": "m.so",
    "abi_version": "1.0", "protocol_version": 1,
    "services": ["plugin.GRPCBroker", "plugin.GRPCStdio",
                 "plugin.GRPCController", "grpc.health.v1.Health"],
    "config": {
        "stdio": {"queue_bytes": 65536, "overflow": "block",
                  "block_timeout_ms": 0, "max_message_bytes": 4096,
                  "coalesce_bytes": 0, "flush_deadline_ms": 10,
                  "max_streams": 4},
        "broker": {"max_streams": 8, "max_subchannels": 3,
                   "max_pending_per_stream": 9, "connect_timeout_ms": 11,
                   "networks": ["unix", "tcp"],
                   "allow_non_loopback": False}}}
DIFF_VALUES = [
    None, True, False, 0, 1, -1, 2, 63, 64, 4095, 4096, 1.0, 1.5, 1e99,
    -1e99, 2**31, 2**34, 2**34 + 1, 2**30, 2**30 + 1, 86400000, 86400001,
    600000, 600001, 100000, 100001, 1000000, 1000001, "", "x", "1.0", "2.0",
    "1", "1.0.0", "01.2", "1.02", "1.12345", "a.b", "block", "drop_oldest",
    "drop_newest", "spill", "unix", "tcp", "udp", [], ["unix"],
    ["tcp", "unix"], ["udp"], ["unix", "unix"], {}, {"a": 1},
    "plugin.GRPCStdio", "proto.KV", "x" * 128, "x" * 129, "x" * 4095,
    "x" * 4096, "x" * 4097, "a..b", "\u00e4.b"]
DIFF_SERVICES = [[], ["proto.KV", "plugin.GRPCStdio"],
                 ["plugin.GRPCStdio", "plugin.GRPCStdio"], ["plugin.Nope"],
                 ["a.b", "c.d"], ["plugin.GRPCController"], ["x" * 256], [1]]


def _paths(d, pre=()):
    for k, v in d.items():
        yield pre + (k,)
        if isinstance(v, dict):
            yield from _paths(v, pre + (k,))


def _mutate(doc, rnd):
    doc = json.loads(json.dumps(doc))
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        p = rnd.choice(list(_paths(doc)) or [("name",)])
        parent = doc
        for k in p[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        r = rnd.random()
        if r < 0.15:
            parent.pop(p[-1], None)
        elif r < 0.25:
            parent["zz_unknown"] = 1
        elif r < 0.35 and p[-1] == "services":
            parent["services"] = json.loads(json.dumps(
                rnd.choice(DIFF_SERVICES)))
        else:  # a copy: values are never shared between documents
            parent[p[-1]] = json.loads(json.dumps(rnd.choice(DIFF_VALUES)))
    return doc


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_schema_and_readers_agree(validator, seed):
    import random
    import struct
    rnd = random.Random(seed)
    docs = [_mutate(rnd.choice([DIFF_INFRA, APP]), rnd) for _ in range(3000)]
    texts = [json.dumps(d).encode() for d in docs]
    p = subprocess.run(
        [os.path.join(BUILD, "tests", "manifest_check")],
        input=b"".join(struct.pack("<I", len(t)) + t for t in texts),
        capture_output=True, timeout=120, check=True)
    verdicts = p.stdout.decode().splitlines()
    assert len(verdicts) == len(docs)
    accepted = 0
    for doc, text, c in zip(docs, texts, verdicts):
        schema_ok = not list(validator.iter_errors(doc))
        accepted += schema_ok
        if schema_ok == (c == "1"):
            continue
        if schema_ok and "expected at most config.stdio.max_message_bytes" \
                in c:
            continue  # the one rule between two fields
        assert False, "schema says %s, the readers %r, for %s" % (
            schema_ok, c, text[:400])
    # Both verdicts were exercised.
    assert 0 < accepted < len(docs), accepted
