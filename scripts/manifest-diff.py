#!/usr/bin/python3
"""The manifest differential run, long: seeded mutations of manifests given
both to the JSON Schema (manifests/rpcplugin-manifest.schema.json, with
Debian's python3-jsonschema) and to the C readers (build/tests/
manifest_check: librpcplugin's manifest reader and the services' config
reader), which must agree.  The mutations are those of
tests/integration/test_manifest_schema.py (which runs 9,000 of them in
the test command).

    scripts/manifest-diff.py [--runs N] [--seed S] [--build DIR]

Prints the count, how many each side accepted and the time; exits 1 at the
first disagreement, printing the document."""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--batch", type=int, default=20000)
    a = ap.parse_args()
    os.environ["RP_BUILD"] = a.build
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    import jsonschema
    import test_manifest_schema as t
    with open(t.SCHEMA) as f:
        schema = json.load(f)
    validator = jsonschema.Draft202012Validator(schema)
    rnd = random.Random(a.seed)
    check = subprocess.Popen([os.path.join(a.build, "tests", "manifest_check")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    done = accepted = 0
    t0 = time.monotonic()
    while done < a.runs:
        n = min(a.batch, a.runs - done)
        docs = [t._mutate(rnd.choice([t.DIFF_INFRA, t.APP]), rnd)
                for _ in range(n)]
        texts = [json.dumps(d).encode() for d in docs]
        data = b"".join(struct.pack("<I", len(x)) + x for x in texts)
        # Written by a thread: the verdicts are read meanwhile (both pipes
        # would fill otherwise).
        w = threading.Thread(target=lambda: (check.stdin.write(data),
                                             check.stdin.flush()))
        w.start()
        for doc, text in zip(docs, texts):
            c = check.stdout.readline().decode().rstrip("\n")
            ok = not list(validator.iter_errors(doc))
            accepted += ok
            if ok == (c == "1"):
                continue
            if ok and "expected at most config.stdio.max_message_bytes" in c:
                continue  # the one rule between two fields
            w.join()
            print("DISAGREE: schema %s, readers %r: %s" % (ok, c, text[:2000]))
            return 1
        w.join()
        done += n
        if done % (a.batch * 25) == 0 or done == a.runs:
            print("%d documents, %d accepted by both, %.0f s" %
                  (done, accepted, time.monotonic() - t0), flush=True)
    check.stdin.close()
    check.wait()
    print("manifest differential: %d documents in %.0f s, schema and readers "
          "agree (%d accepted)" % (done, time.monotonic() - t0, accepted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
