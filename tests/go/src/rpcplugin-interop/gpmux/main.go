// gpmux is a go-plugin client with gRPC broker multiplexing, following
// go-plugin v1.8.0's client with ClientConfig.GRPCBrokerMultiplex (see
// package muxclient): it starts the plugin with PLUGIN_MULTIPLEX_GRPC=true,
// requires the handshake line's 7th field "true", makes ONE connection
// with a yamux session on it, and runs everything over that: the main gRPC
// connection (a stream), the broker's knocks, brokered connections both ways.
//
//	gpmux [--automtls] [--timeout 20s] [--plugin CMD] [--magic-cookie K=V] STEP...
//
// It prints "OK handshake ...", then runs the steps in order, each printing
// "OK <step> <details>" on stdout, or "FAIL <step>: <error>" on stderr and
// exit 1.  Steps:
//
//	health            Health/Check "plugin" on the main connection: SERVING
//	stdio NEEDLE      read StreamStdio until the stdout data holds NEEDLE's whole line
//	stdiocount N      read until N more stdout lines arrived: "line K+1".."line K+N"
//	slowstdio N MS    the same, sleeping MS ms after each message (a slow reader),
//	                  with a Health/Check every 100 ms meanwhile (none may fail)
//	put KEY VALUE     Counter.Put, add_server = a new id served here by AddHelper
//	putfail KEY VALUE Counter.Put with an add_server id nobody serves: the
//	                  plugin's knock gets an ack with "no listener for id N";
//	                  the call must fail (prints the error)
//	get KEY           Counter.Get
//	dial ID           knock for ID, open a stream, Health/Check "" over it
//	dialfail ID       the same, which must fail (prints the error)
//	shutdown          Controller/Shutdown; the process exits; the session closes
//	stats             dials=1 streams_opened=N streams_accepted=M ...
//
// The StreamStdio call is opened by the first stdio step and kept (one
// stream, as go-plugin has; unread data stays for the next step).  At the
// end the plugin's process group is killed if it is still running.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"rpcplugin-interop/common"
	"rpcplugin-interop/kvshared"
	"rpcplugin-interop/muxclient"
)

var nargs = map[string]int{"health": 0, "stdio": 1, "stdiocount": 1, "slowstdio": 2,
	"put": 2, "putfail": 2, "get": 1, "dial": 1, "dialfail": 1, "shutdown": 0, "stats": 0}

type client struct {
	timeout time.Duration
	p       *muxclient.Plugin
	m       *muxclient.Muxer
	conn    *grpc.ClientConn
	b       *muxclient.Broker
	stdio   *stdioReader
}

var cl client

func say(format string, a ...interface{}) { fmt.Fprintf(os.Stdout, format+"\n", a...) }

func logf(format string, a ...interface{}) { fmt.Fprintf(os.Stderr, "gpmux: "+format+"\n", a...) }

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", step, err)
	cleanup()
	os.Exit(1)
}

func cleanup() {
	if cl.b != nil {
		cl.b.Close()
	}
	if cl.conn != nil {
		cl.conn.Close()
	}
	if cl.m != nil {
		cl.m.Close()
	}
	if cl.p != nil {
		cl.p.Kill()
	}
}

func main() {
	fs := flag.NewFlagSet("gpmux", flag.ExitOnError)
	automtls := fs.Bool("automtls", false, "AutoMTLS (PLUGIN_CLIENT_CERT; TLS on every connection)")
	timeout := fs.Duration("timeout", 20*time.Second, "bound for the handshake and each step")
	plugin := fs.String("plugin", os.Getenv("GPMUX_PLUGIN"), "plugin command, run with sh -c (default $GPMUX_PLUGIN)")
	cookie := fs.String("magic-cookie", "BASIC_PLUGIN=hello", "the magic cookie KEY=VALUE")
	versions := fs.String("app-versions", "1", "PLUGIN_PROTOCOL_VERSIONS")
	fs.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: gpmux [FLAGS] STEP...  (steps: health, stdio NEEDLE, stdiocount N, "+
			"slowstdio N MS, put KEY VALUE, get KEY, dial ID, dialfail ID, shutdown, stats)")
		fs.PrintDefaults()
	}
	fs.Parse(os.Args[1:])
	args := fs.Args()
	var steps [][]string
	for i := 0; i < len(args); {
		n, ok := nargs[args[i]]
		if !ok || i+n >= len(args) {
			fs.Usage()
			os.Exit(2)
		}
		steps = append(steps, args[i:i+1+n])
		i += 1 + n
	}
	if *plugin == "" || len(steps) == 0 {
		fs.Usage()
		os.Exit(2)
	}
	key, value, err := common.ParseCookie(*cookie)
	if err != nil {
		fail("flags", err)
	}
	cl.timeout = *timeout

	p, err := muxclient.Start(muxclient.Options{Command: *plugin, CookieKey: key, CookieValue: value,
		Versions: *versions, AutoMTLS: *automtls, Timeout: *timeout, Stderr: os.Stderr})
	cl.p = p
	if err != nil {
		fail("handshake", err)
	}
	h := p.Handshake
	say("OK handshake fields=%d network=%s protocol=%s app=%d tls=%v mux=%v",
		h.Fields, h.Network, h.Protocol, h.App, p.TLS != nil, h.Mux)
	cl.m, cl.conn, cl.b, err = muxclient.Connect(h, p.TLS, logf)
	if err != nil {
		fail("connect", err)
	}
	for _, s := range steps {
		detail, err := run(s[0], s[1:])
		if err != nil {
			fail(s[0], err)
		}
		say("OK %s %s", s[0], detail)
	}
	cleanup()
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), cl.timeout)
}

func run(step string, a []string) (string, error) {
	switch step {
	case "health":
		st, err := common.HealthCheck(cl.conn, "plugin", cl.timeout)
		if err != nil {
			return "", err
		}
		if st != grpc_health_v1.HealthCheckResponse_SERVING {
			return "", fmt.Errorf("status %v", st)
		}
		return st.String(), nil
	case "stdio":
		r, err := openStdio()
		if err != nil {
			return "", err
		}
		return r.until([]byte(a[0]))
	case "stdiocount", "slowstdio":
		n, err := strconv.Atoi(a[0])
		if err != nil || n < 0 {
			return "", fmt.Errorf("bad count %q", a[0])
		}
		var pause time.Duration
		if step == "slowstdio" {
			ms, err := strconv.Atoi(a[1])
			if err != nil || ms < 0 {
				return "", fmt.Errorf("bad milliseconds %q", a[1])
			}
			pause = time.Duration(ms) * time.Millisecond
		}
		r, err := openStdio()
		if err != nil {
			return "", err
		}
		return r.count(n, pause)
	case "put":
		return put(a[0], a[1], true)
	case "putfail":
		return put(a[0], a[1], false)
	case "get":
		c, cancel := ctx()
		defer cancel()
		resp, err := kvshared.Invoke(c, cl.conn, kvshared.CounterGetMethod, kvshared.GetRequest{Key: a[0]}.Marshal())
		if err != nil {
			return "", err
		}
		var m kvshared.CounterGetResponse
		if err := m.Unmarshal(resp); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s %d", a[0], m.Value), nil
	case "dial", "dialfail":
		id, err := strconv.ParseUint(a[0], 10, 32)
		if err != nil {
			return "", fmt.Errorf("bad id %q", a[0])
		}
		t0 := time.Now()
		st, err := dialHealth(uint32(id))
		ms := time.Since(t0).Milliseconds()
		if step == "dialfail" {
			if err == nil {
				return "", fmt.Errorf("dial %d succeeded (%v)", id, st)
			}
			return fmt.Sprintf("%d ms=%d %v", id, ms, err), nil
		}
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d %v ms=%d", id, st, ms), nil
	case "shutdown":
		return shutdown()
	case "stats":
		d, o, ac := cl.m.Stats()
		return fmt.Sprintf("dials=%d streams_opened=%d streams_accepted=%d knocks_in=%d ack_errors_out=%d stray=%d",
			d, o, ac, atomic.LoadInt64(&cl.b.KnocksIn), atomic.LoadInt64(&cl.b.AckErrorsOut),
			atomic.LoadInt64(&cl.b.Stray)), nil
	}
	return "", errors.New("unknown step")
}

// dialHealth: broker.Dial(id), then Health/Check "" over it.
func dialHealth(id uint32) (grpc_health_v1.HealthCheckResponse_ServingStatus, error) {
	conn, err := cl.b.Dial(id)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return common.HealthCheck(conn, "", cl.timeout)
}

// adder is this side's AddHelper; it counts the calls the plugin makes.
type adder struct{ calls int64 }

func (a *adder) Sum(_ context.Context, x, y int64) (int64, error) {
	atomic.AddInt64(&a.calls, 1)
	return x + y, nil
}

// put is examples/bidirectional's Counter.Put on a multiplexed broker: a
// new id served by AddHelper (knock-blocked listener, no ConnInfo sent),
// Counter/Put with that id, then the server stops.
func put(key, val string, serve bool) (string, error) {
	v, err := strconv.ParseInt(val, 10, 64)
	if err != nil {
		return "", err
	}
	a := &adder{}
	id := cl.b.NextId()
	if serve {
		stop := cl.b.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
			s := kvshared.NewServer(opts)
			kvshared.RegisterAddHelper(s, a)
			return s
		})
		defer stop()
	}
	c, cancel := ctx()
	defer cancel()
	ackErrs := atomic.LoadInt64(&cl.b.AckErrorsOut)
	resp, err := kvshared.Invoke(c, cl.conn, kvshared.CounterPutMethod,
		kvshared.CounterPutRequest{AddServer: id, Key: key, Value: v}.Marshal())
	if !serve {
		if err == nil {
			return "", fmt.Errorf("Put with unserved add_server=%d succeeded", id)
		}
		return fmt.Sprintf("%s %d add_server=%d ack_errors_out=%d %v", key, v, id,
			atomic.LoadInt64(&cl.b.AckErrorsOut)-ackErrs, err), nil
	}
	if err != nil {
		return "", err
	}
	if err := new(kvshared.Empty).Unmarshal(resp); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %d add_server=%d sums=%d", key, v, id, atomic.LoadInt64(&a.calls)), nil
}

// ---------------------------------------------------------------- stdio

type recvResult struct {
	d   common.StdioData
	err error
}

type stdioReader struct {
	st       grpc.ClientStream
	buf      []byte // stdout bytes not consumed by a step yet
	newlines int    // '\n' in buf
	lines    int    // lines consumed by stdiocount/slowstdio
	msgs     int
	outBytes int
	errBytes int
	pending  chan recvResult // a RecvMsg in flight
	end      error           // how the stream ended (io.EOF: status OK)
}

func openStdio() (*stdioReader, error) {
	if cl.stdio != nil {
		return cl.stdio, nil
	}
	st, err := cl.conn.NewStream(context.Background(), &grpc.StreamDesc{StreamName: "StreamStdio", ServerStreams: true},
		"/plugin.GRPCStdio/StreamStdio", grpc.ForceCodec(kvshared.RawCodec{}))
	if err != nil {
		return nil, err
	}
	empty := []byte{}
	if err := st.SendMsg(&empty); err != nil {
		return nil, err
	}
	if err := st.CloseSend(); err != nil {
		return nil, err
	}
	cl.stdio = &stdioReader{st: st}
	return cl.stdio, nil
}

// next reads one StdioData, waiting at most d; stdout data goes to buf.
func (r *stdioReader) next(d time.Duration) error {
	if r.end != nil {
		return fmt.Errorf("stream ended: %v", r.end)
	}
	if d <= 0 {
		return fmt.Errorf("step timeout (%v) reached (messages=%d stdout_bytes=%d stderr_bytes=%d, %d stdout lines pending)",
			cl.timeout, r.msgs, r.outBytes, r.errBytes, r.newlines)
	}
	if r.pending == nil {
		r.pending = make(chan recvResult, 1)
		go func(ch chan recvResult) {
			var raw []byte
			err := r.st.RecvMsg(&raw)
			if err != nil {
				ch <- recvResult{err: err}
				return
			}
			m, err := common.DecodeStdioData(raw)
			ch <- recvResult{d: m, err: err}
		}(r.pending)
	}
	select {
	case res := <-r.pending:
		r.pending = nil
		if res.err != nil {
			r.end = res.err
			return fmt.Errorf("stream ended: %v", res.err)
		}
		r.msgs++
		switch res.d.Channel {
		case muxclient.StdioStdout:
			r.outBytes += len(res.d.Data)
			r.buf = append(r.buf, res.d.Data...)
			r.newlines += bytes.Count(res.d.Data, []byte{'\n'})
		default:
			r.errBytes += len(res.d.Data)
		}
		return nil
	case <-time.After(d):
		return fmt.Errorf("no StdioData for %v (messages=%d stdout_bytes=%d stderr_bytes=%d, %d stdout lines pending)",
			d, r.msgs, r.outBytes, r.errBytes, r.newlines)
	}
}

func (r *stdioReader) summary() string {
	return fmt.Sprintf("bytes=%d messages=%d stderr_bytes=%d", r.outBytes, r.msgs, r.errBytes)
}

// until reads until buf contains needle and the end of its line, and
// consumes buf through that line (those lines count as read for
// stdiocount's numbering).
func (r *stdioReader) until(needle []byte) (string, error) {
	deadline := time.Now().Add(cl.timeout)
	for {
		if i := bytes.Index(r.buf, needle); i >= 0 {
			if j := bytes.IndexByte(r.buf[i+len(needle):], '\n'); j >= 0 {
				end := i + len(needle) + j + 1
				r.lines += bytes.Count(r.buf[:end], []byte{'\n'})
				r.consume(end)
				return r.summary(), nil
			}
		}
		if err := r.next(time.Until(deadline)); err != nil {
			return "", fmt.Errorf("%q not seen: %v", needle, err)
		}
	}
}

func (r *stdioReader) consume(n int) {
	r.newlines -= bytes.Count(r.buf[:n], []byte{'\n'})
	r.buf = append(r.buf[:0], r.buf[n:]...)
}

// count reads until n more lines are in buf, checks they are "line K+1" ..
// "line K+n" and consumes them.  With pause > 0 it sleeps after each
// message read (a slow reader) while a prober checks Health every 100 ms.
func (r *stdioReader) count(n int, pause time.Duration) (string, error) {
	var probes, probeFails int64
	var maxProbe int64
	var probeErr atomic.Value
	stopProbe := make(chan struct{})
	var wg sync.WaitGroup
	if pause > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stopProbe:
					return
				case <-tick.C:
				}
				t0 := time.Now()
				st, err := common.HealthCheck(cl.conn, "plugin", 2*time.Second)
				ms := time.Since(t0).Milliseconds()
				atomic.AddInt64(&probes, 1)
				if ms > atomic.LoadInt64(&maxProbe) {
					atomic.StoreInt64(&maxProbe, ms)
				}
				if err != nil || st != grpc_health_v1.HealthCheckResponse_SERVING {
					atomic.AddInt64(&probeFails, 1)
					probeErr.Store(fmt.Sprintf("%v %v", st, err))
				}
			}
		}()
	}
	deadline := time.Now().Add(cl.timeout)
	var err error
	for r.newlines < n && err == nil {
		if err = r.next(time.Until(deadline)); err == nil && pause > 0 {
			time.Sleep(pause) // the scenario: a deliberately slow reader
		}
	}
	close(stopProbe)
	wg.Wait()
	if err != nil {
		return "", fmt.Errorf("%d of %d lines: %v", r.newlines, n, err)
	}
	if f := atomic.LoadInt64(&probeFails); f > 0 {
		return "", fmt.Errorf("%d of %d health probes failed during the slow read: %v", f, probes, probeErr.Load())
	}
	data := r.buf
	off := 0
	for i := 1; i <= n; i++ {
		j := bytes.IndexByte(data[off:], '\n')
		got := string(data[off : off+j])
		if want := "line " + strconv.Itoa(r.lines+i); got != want {
			return "", fmt.Errorf("stdout line %d is %q, expected %q", r.lines+i, trunc(got), want)
		}
		off += j + 1
	}
	r.consume(off)
	first := r.lines + 1
	r.lines += n
	s := fmt.Sprintf("%d lines=%d..%d %s", n, first, r.lines, r.summary())
	if pause > 0 {
		s += fmt.Sprintf(" probes=%d max_probe_ms=%d", probes, maxProbe)
	}
	return s, nil
}

func trunc(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// ---------------------------------------------------------------- shutdown

// shutdown is GRPCClient.Close + Kill's wait: Controller/Shutdown, the
// process exits, the yamux session closes; meanwhile an open StreamStdio is
// read to its end (go-plugin's stdio client reads all along).
func shutdown() (string, error) {
	stdioEnd := make(chan string, 1)
	if r := cl.stdio; r != nil {
		go func() {
			for {
				if err := r.next(cl.timeout); err != nil {
					if r.end == io.EOF {
						stdioEnd <- "OK"
					} else if r.end != nil {
						stdioEnd <- status.Code(r.end).String()
					} else {
						stdioEnd <- "STILL_OPEN"
					}
					return
				}
			}
		}()
	} else {
		stdioEnd <- "none"
	}
	c, cancel := ctx()
	defer cancel()
	empty := []byte{}
	var resp []byte
	rpc := "OK"
	if err := cl.conn.Invoke(c, "/plugin.GRPCController/Shutdown", &empty, &resp,
		grpc.ForceCodec(kvshared.RawCodec{})); err != nil {
		rpc = status.Code(err).String()
		logf("Shutdown: %v", err)
	}
	select {
	case <-cl.p.Exited():
	case <-time.After(cl.timeout):
		return "", fmt.Errorf("plugin still running %v after Shutdown (rpc=%s)", cl.timeout, rpc)
	}
	select {
	case <-cl.m.Session().CloseChan():
	case <-time.After(cl.timeout):
		return "", fmt.Errorf("plugin exited (%s) but the yamux session is still open after %v", cl.p.Status(), cl.timeout)
	}
	goaway := "none"
	if seen, code := cl.m.GoAway(); seen {
		goaway = map[uint32]string{0: "normal", 1: "protocol_error", 2: "internal_error"}[code]
		if goaway == "" {
			goaway = "code" + strconv.Itoa(int(code))
		}
	}
	se := <-stdioEnd
	broker := "open"
	if err := cl.b.Err(); err != nil {
		switch inner := errors.Unwrap(err); {
		case inner == io.EOF:
			broker = "OK"
		case inner != nil:
			broker = status.Code(inner).String()
		default:
			broker = "never_opened"
		}
	}
	return fmt.Sprintf("rpc=%s %s session_closed=true goaway=%s stdio_end=%s broker_end=%s",
		rpc, cl.p.Status(), goaway, se, broker), nil
}
