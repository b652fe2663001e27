"""rpcplugin-host and COMMAND: the child's stdout/stderr (and the host's own)
reach the client through GRPCStdio, including what was written before the
client connected; whole lines go out in large chunks; the child's exit is
reported and (by default) ends the host; SIGTERM with a stream open ends
the stream with OK; no descendant keeps the host's original stderr (a
go-plugin client waits for EOF on it); the child's process group is
terminated at exit."""
import os
import signal

import grpc

from conftest import manifest_path, write_manifest
from hostutil import (DEFAULT_MANIFEST, HOST_MANIFEST, Stdio,
                      pid_gone, wait_until)


def sh(script):
    return ["/bin/sh", "-c", script]


def test_output_before_client_connects(hosts, tmp_path):
    done = tmp_path / "done"
    h = hosts(command=sh(
        'printf "out1\\nout2\\n"; printf "err1\\n" >&2; printf partial; '
        ': > %s' % done), options=["--no-exit-with-child"])
    # The child wrote everything and ended before any client connected.
    wait_until(done.exists, 10, "the child to finish")
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"out1\nout2\npartial")
    out.wait_contains(2, b"err1\n")
    # The host reports the child's end on the stderr channel ...
    out.wait_contains(2, b"(/bin/sh) exited with status 0\n")
    # ... and keeps serving (--no-exit-with-child).
    assert h.health(ch) == 1
    assert bytes(out.data[1]) == b"out1\nout2\npartial"
    h.shutdown(ch)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


def test_sigterm_with_stream_open(hosts, tmp_path):
    pidfile = tmp_path / "pid"
    h = hosts(command=sh('echo $$ > %s; echo ready; exec sleep 60' % pidfile))
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"ready\n")
    child = int(pidfile.read_text())
    sockdir = os.path.dirname(h.handshake.address)
    h.signal(signal.SIGTERM)
    # The open stream ends with status OK, the host exits 0 ...
    assert out.wait_end() == grpc.StatusCode.OK, out.error
    assert h.wait() == 0
    # ... after terminating its child and removing its socket.
    assert pid_gone(child)
    assert not os.path.exists(sockdir)
    # The child's end was reported before the stream finished.
    assert b"was killed by signal 15" in out.data[2]


def test_child_exit_ends_host(hosts, tmp_path):
    go = tmp_path / "go"
    h = hosts(command=sh(
        'while [ ! -e %s ]; do sleep 0.01; done; echo bye; echo oops >&2; '
        'exit 3' % go))
    ch = h.channel()
    out = Stdio(ch)
    assert h.health(ch) == 1
    go.touch()
    assert out.wait_end() == grpc.StatusCode.OK, out.error
    assert bytes(out.data[1]) == b"bye\n"
    assert b"oops\n" in out.data[2]
    assert b"(/bin/sh) exited with status 3\n" in out.data[2]
    # The graceful path exits 0 whatever the child's status.
    assert h.wait() == 0


def test_command_not_found(hosts):
    h = hosts(command=["/nonexistent/program", "x"],
              options=["--no-exit-with-child"])
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(2, b"cannot run /nonexistent/program: No such file")
    out.wait_contains(2, b"exited with status 127")
    h.shutdown(ch)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


def test_descendants_never_hold_original_stderr(hosts, tmp_path):
    # A grandchild in the child's group and one that left it with setsid:
    # neither may keep the host's original stderr open, or a go-plugin
    # client's Kill() would wait for EOF on it.
    pids = tmp_path / "pids"
    h = hosts(command=sh(
        'sleep 60 & a=$!; setsid sleep 61 & b=$!; '
        'echo "$a $b" > %s.tmp; mv %s.tmp %s; exec sleep 62'
        % (pids, pids, pids)))
    wait_until(pids.exists, 10, "the grandchildren")
    in_group, escaped = (int(p) for p in pids.read_text().split())
    try:
        ch = h.channel()
        h.shutdown(ch)
        assert h.wait() == 0
        h.wait_stderr_eof(timeout=5)
        assert h.next_line() is None  # stdout at EOF too
        # The child's process group was terminated ...
        wait_until(lambda: pid_gone(in_group), 5, "the grandchild to end")
        # ... the one that left it was not (it only holds the stdio pipe).
        assert not pid_gone(escaped)
    finally:
        try:
            os.kill(escaped, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_child_ignoring_sigterm_is_killed(hosts, tmp_path):
    pidfile = tmp_path / "pid"
    h = hosts(command=sh("trap '' TERM; echo $$ > %s; echo armed; "
                         "while :; do sleep 0.05; done" % pidfile),
              options=["--kill-grace", "100"])
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"armed\n")
    child = int(pidfile.read_text())
    h.signal(signal.SIGTERM)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0
    assert pid_gone(child)
    assert b"sending SIGKILL" in out.data[2]
    assert b"was killed by signal 9" in out.data[2]


def test_lines_go_out_in_large_chunks(hosts):
    # 200,000 lines of 64 bytes (12.8 MB), the default manifest (overflow
    # "block": nothing may be lost).  Whole lines, in order, and far fewer
    # messages than lines.
    n = 200000
    h = hosts(manifest=DEFAULT_MANIFEST,
              command=["seq", "-f", "%063g", "1", str(n)],
              options=["--no-exit-with-child"])
    ch = h.channel()
    out = Stdio(ch, timeout=120)
    total = 64 * n
    out.wait_for(lambda s: len(s.data[1]) >= total, timeout=60,
                 what="all lines")
    data = bytes(out.data[1])
    assert len(data) == total
    lines = data.split(b"\n")
    assert lines[-1] == b"" and len(lines) == n + 1
    assert lines[0] == b"%063d" % 1 and lines[n - 1] == b"%063d" % n
    assert all(len(x) == 63 for x in lines[:-1])
    assert out.messages < n // 20, out.messages
    h.shutdown(ch)
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


def test_unread_output_does_not_block_child(hosts, tmp_path):
    # manifests/host.json keeps the newest 8 MiB when nobody reads (as with
    # a go-plugin v1.0.1 client): a child writing 32 MiB finishes, and the
    # host exits with it.
    h = hosts(manifest=HOST_MANIFEST,
              command=["head", "-c", str(32 << 20), "/dev/zero"])
    assert h.wait(timeout=30) == 0


def test_manifest_without_stdio_uses_original_fds(hosts):
    # No GRPCStdio in the manifest: the output goes to the host's original
    # stdout/stderr instead, after the handshake line.
    h = hosts(manifest=manifest_path("controller-health.json"),
              command=sh("echo to-out; echo to-err >&2"))
    assert h.next_line() == "to-out"
    assert h.next_line() is None
    assert h.wait() == 0
    h.wait_stderr_eof()
    assert "to-err\n" in h.stderr()
    assert "exited with status 0" in h.stderr()


def test_host_messages_reach_stderr_channel(hosts):
    h = hosts(options=["-v"])
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(2, b"rpcplugin-host: serving rpcplugin-host")
    h.shutdown(ch)
    out.wait_contains(2, b"shutting down (Shutdown requested)")
    assert out.wait_end() == grpc.StatusCode.OK
    assert h.wait() == 0


def test_small_drop_queue_keeps_newest_lines(hosts, tmp_path):
    # A 64 KiB drop_oldest queue and 200 KiB written at once before any
    # client connects: the host hands put_line chunks of at most an eighth
    # of the queue, cut after a newline, so the queue keeps the newest
    # whole lines instead of dropping one chunk larger than itself.
    #
    # The client must connect only after the host put all of it: a stream
    # that starts while puts still drop lines sees a gap (drop_oldest doing
    # its job), not what this test is about.  The pipe is 1 MiB, so the
    # child's write returns at once; the child waits until the pipe is
    # empty (FIONREAD on its end), which means the host's one reader
    # thread read it all, then writes the last line alone and waits for
    # that to be read too: the reader takes it only after its puts of the
    # 200 KiB returned.  Only that last line's own put may still be under
    # way when the client connects.
    man = write_manifest(tmp_path, config={"stdio": {
        "queue_bytes": 65536, "overflow": "drop_oldest"}})
    done = tmp_path / "done"
    script = ("import fcntl, os, struct, termios, time\n"
              "def drained():\n"
              "    for _ in range(10000):\n"
              "        n = fcntl.ioctl(1, termios.FIONREAD, b'\\0' * 4)\n"
              "        if struct.unpack('i', n)[0] == 0:\n"
              "            return\n"
              "        time.sleep(0.001)\n"
              "    raise SystemExit('the host did not read the pipe')\n"
              "os.write(1, b''.join(b'%%099d\\n' %% i for i in range(2048)))\n"
              "drained()\n"
              "os.write(1, b'%%099d\\n' %% 2048)\n"
              "drained()\n"
              "open(%r, 'w').close()\n" % str(done))
    h = hosts(manifest=man, command=["/usr/bin/python3", "-c", script],
              options=["--no-exit-with-child"])
    wait_until(done.exists, 20, "the child's output")
    ch = h.channel()
    out = Stdio(ch)
    out.wait_contains(1, b"%099d\n" % 2048)
    data = bytes(out.data[1])
    assert 0 < len(data) <= 65536
    lines = data.split(b"\n")
    assert lines[-1] == b""
    # Whole lines only, consecutive, ending with the last one.
    nums = [int(x) for x in lines[:-1]]
    assert all(len(x) == 99 for x in lines[:-1])
    assert nums == list(range(nums[0], 2049))
    # The queue was full: the newest lines kept fill most of it (no chunk
    # is larger than an eighth of it).
    assert len(data) > 65536 - 65536 // 8
    h.shutdown(ch)
    assert h.wait() == 0
