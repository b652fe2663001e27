#!/usr/bin/python3
"""Reference crowdsec notification plugin, in Python, without generated code.

Used to validate tests/crowdsec/run_notifier_test.sh (see README.md there).
It speaks go-plugin v1.0.1's gRPC protocol as crowdsec 1.4.6 expects:

- Magic cookie: crowdsec sets CROWDSEC_PLUGIN_KEY to a fresh random UUID on
  every launch and its own plugins compare the variable with itself
  (MagicCookieValue = os.Getenv("CROWDSEC_PLUGIN_KEY")), so the only check
  possible is "set and non-empty". Without it we print go-plugin's text and
  exit 1, as a go-plugin plugin does.
- Handshake: one stdout line "1|1|unix|/path/plugin.sock|grpc" (default) or
  "1|1|tcp|127.0.0.1:PORT|grpc" (RPCNOTIFY_NETWORK=tcp: first free port in
  PLUGIN_MIN_PORT..PLUGIN_MAX_PORT, which crowdsec's client sets to
  10000..25000). The unix socket lives in a fresh 0700 folder under
  PLUGIN_UNIX_SOCKET_DIR, else TMPDIR, else /tmp (go-plugin v1.0.1 itself
  uses ioutil.TempFile("", "plugin"), i.e. TMPDIR or /tmp).
- Services: grpc.health.v1.Health/Check ("" or "plugin" -> SERVING),
  plugin.GRPCController/Shutdown (reply, then stop and exit 0),
  plugin.GRPCBroker/StartStream (accepted and drained; crowdsec never knocks),
  proto.Notifier/Configure(Config{bytes config = 2}) and
  proto.Notifier/Notify(Notification{string text = 1; string name = 2}),
  both returning proto.Empty. Everything else answers UNIMPLEMENTED.
- Configure carries the notification's YAML as crowdsec re-marshals it
  (yaml.v2, keys: type, name, format, timeout, max_retry, ... plus the
  plugin-specific keys inline at top level). We read two top-level lines:
  "name: X" and "output_file: /path". Notify appends one JSON line
  {"name": ..., "text": ...} to the output_file of the notification named by
  Notification.name.
- Logs go to stderr as hclog JSON lines, which go-plugin's client parses
  and crowdsec writes into its own log (with "@level").
- SIGINT is ignored (as go-plugin's Serve does); SIGTERM exits; so does
  losing the parent (crowdsec 1.4.6 can exit on SIGTERM without waiting
  for its plugin broker to send Shutdown, leaving plugins orphaned).
"""

import json
import os
import signal
import sys
import tempfile
import threading
import time

COOKIE_KEY = "CROWDSEC_PLUGIN_KEY"
CORE_PROTOCOL = 1
APP_PROTOCOL = 1


def log(level, msg, **kv):
    rec = {"@level": level, "@message": msg, "@module": "py-notifier",
           "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())}
    rec.update(kv)
    try:
        sys.stderr.write(json.dumps(rec) + "\n")
        sys.stderr.flush()
    except Exception:
        pass


# --- protobuf, by hand -------------------------------------------------------

def _varint(buf, i):
    shift = 0
    val = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if not b & 0x80:
            return val, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def pb_fields(buf):
    """Yield (field_number, wire_type, value) for a protobuf message.
    Length-delimited values are bytes; others are ints or raw bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            if i + ln > len(buf):
                raise ValueError("truncated field")
            val, i = bytes(buf[i:i + ln]), i + ln
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("unsupported wire type %d" % wt)
        if i > len(buf):
            raise ValueError("truncated message")
        yield field, wt, val


def pb_string_fields(buf, wanted):
    """Return {field_number: bytes} for the length-delimited fields wanted
    (last one wins, as protobuf says)."""
    out = {}
    for field, wt, val in pb_fields(buf):
        if field in wanted and wt == 2:
            out[field] = val
    return out


# --- notification config ----------------------------------------------------

def _yaml_scalar(v):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return json.loads(v)  # yaml.v2 double quotes: JSON-like escapes
    if len(v) >= 2 and v[0] == v[-1] == "'":
        return v[1:-1].replace("''", "'")
    return v


def parse_config(text):
    """Top-level 'key: value' lines only; enough for name and output_file."""
    cfg = {}
    for line in text.splitlines():
        if not line or line[0] in " \t#-" or ":" not in line:
            continue
        key, _, val = line.partition(":")
        cfg[key.strip()] = _yaml_scalar(val)
    return cfg


class Notifier:
    def __init__(self):
        self.lock = threading.Lock()
        self.configs = {}  # notification name -> dict

    def configure(self, request, context):
        import grpc
        try:
            raw = pb_string_fields(request, {2}).get(2, b"")
            cfg = parse_config(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad Config: %s" % e)
        name = cfg.get("name", "")
        if not cfg.get("output_file"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "notification %r: no output_file in config" % name)
        with self.lock:
            self.configs[name] = cfg
        log("info", "configured", name=name, output_file=cfg["output_file"],
            config_yaml=raw.decode("utf-8", "replace"))
        return b""

    def notify(self, request, context):
        import grpc
        try:
            f = pb_string_fields(request, {1, 2})
            text = f.get(1, b"").decode("utf-8")
            name = f.get(2, b"").decode("utf-8")
        except Exception as e:  # noqa: BLE001
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad Notification: %s" % e)
        with self.lock:
            cfg = self.configs.get(name)
            if cfg is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "notification %r was never configured" % name)
            line = json.dumps({"name": name, "text": text}) + "\n"
            with open(cfg["output_file"], "a", encoding="utf-8") as fh:
                fh.write(line)
        log("info", "notified", name=name, bytes=len(text))
        return b""


# --- go-plugin services -----------------------------------------------------

def main():
    if not os.environ.get(COOKIE_KEY):
        sys.stderr.write(
            "This binary is a plugin. These are not meant to be executed directly.\n"
            "Please execute the program that consumes these plugins, which will\n"
            "load any plugins automatically\n")
        return 1

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import grpc  # imported late: the cookie check above stays fast
    from concurrent import futures

    versions = os.environ.get("PLUGIN_PROTOCOL_VERSIONS", "")
    if versions and str(APP_PROTOCOL) not in versions.split(","):
        log("warn", "client offers no protocol version we speak", offered=versions)

    log("debug", "started", pid=os.getpid(), uid=os.getuid(), gid=os.getgid(),
        groups=os.getgroups(), cwd=os.getcwd(), argv=sys.argv,
        env=sorted(k for k in os.environ),
        cookie=os.environ.get(COOKIE_KEY),
        min_port=os.environ.get("PLUGIN_MIN_PORT"),
        max_port=os.environ.get("PLUGIN_MAX_PORT"),
        protocol_versions=versions)

    done = threading.Event()
    notifier = Notifier()

    def health_check(request, context):
        try:
            service = pb_string_fields(request, {1}).get(1, b"").decode("utf-8")
        except Exception as e:  # noqa: BLE001
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if service not in ("", "plugin"):
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        log("debug", "Health/Check", service=service)
        return b"\x08\x01"  # HealthCheckResponse{status: SERVING}

    def shutdown(request, context):
        log("info", "Shutdown received")
        # Stop only once the reply is on its way.
        context.add_callback(done.set)
        return b""

    def start_stream(request_iterator, context):
        # crowdsec never asks the plugin to dial anything: just drain.
        log("debug", "GRPCBroker/StartStream opened")
        for _ in request_iterator:
            pass
        log("debug", "GRPCBroker/StartStream closed by the client")
        return
        yield  # pragma: no cover  (makes this a generator)

    uu = grpc.unary_unary_rpc_method_handler
    handlers = [
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": uu(health_check)}),
        grpc.method_handlers_generic_handler("plugin.GRPCController", {
            "Shutdown": uu(shutdown)}),
        grpc.method_handlers_generic_handler("plugin.GRPCBroker", {
            "StartStream": grpc.stream_stream_rpc_method_handler(start_stream)}),
        grpc.method_handlers_generic_handler("proto.Notifier", {
            "Notify": uu(notifier.notify),
            "Configure": uu(notifier.configure)}),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=handlers)

    sock_dir = None
    network = os.environ.get("RPCNOTIFY_NETWORK", "unix")
    if network == "tcp":
        lo = int(os.environ.get("PLUGIN_MIN_PORT") or 0)
        hi = int(os.environ.get("PLUGIN_MAX_PORT") or 0)
        ports = range(lo, hi + 1) if lo and hi >= lo else [0]
        address = None
        for port in ports:
            try:
                got = server.add_insecure_port("127.0.0.1:%d" % port)
            except RuntimeError:
                got = 0
            if got:
                address = "127.0.0.1:%d" % got
                break
        if address is None:
            log("error", "no free port", min=lo, max=hi)
            return 1
    else:
        base = (os.environ.get("PLUGIN_UNIX_SOCKET_DIR")
                or os.environ.get("TMPDIR") or "/tmp")
        sock_dir = tempfile.mkdtemp(prefix="plugin", dir=base)
        address = os.path.join(sock_dir, "plugin.sock")
        if not server.add_insecure_port("unix:" + address):
            log("error", "cannot bind unix socket", path=address)
            return 1
        network = "unix"

    server.start()
    log("debug", "serving", network=network, address=address)
    sys.stdout.write("%d|%d|%s|%s|grpc\n" % (CORE_PROTOCOL, APP_PROTOCOL, network, address))
    sys.stdout.flush()

    def on_term(signum, frame):
        done.set()
    signal.signal(signal.SIGTERM, on_term)

    # crowdsec 1.4.6 may exit on SIGTERM before its plugin broker sends
    # Shutdown: then we are orphaned. Go away with our parent.
    parent = os.getppid()
    try:
        while not done.wait(0.5):
            if os.getppid() != parent:
                log("info", "parent process gone, exiting", parent=parent)
                break
    finally:
        server.stop(0.5).wait(2)
        if sock_dir:
            try:
                os.unlink(address)
            except OSError:
                pass
            try:
                os.rmdir(sock_dir)
            except OSError:
                pass
    log("info", "exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
