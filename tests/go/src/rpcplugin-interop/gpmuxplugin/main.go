// gpmuxplugin is a FAKE plugin, for testing gpmux only: it behaves like a
// go-plugin v1.8.0 plugin served with PLUGIN_MULTIPLEX_GRPC=true (its
// GRPCServerMuxer and broker), with go-plugin's examples' handshake
// (cookie BASIC_PLUGIN=hello) and the bidirectional example's Counter:
//
//   - listens on a unix socket in a new folder (in $PLUGIN_UNIX_SOCKET_DIR
//     or $TMPDIR), prints 1|1|unix|PATH|grpc|CERT|true (CERT only with
//     PLUGIN_CLIENT_CERT; the 7th field only when PLUGIN_MULTIPLEX_GRPC is
//     set, and not with GPMUXPLUGIN_NO_MUX=1, which plays an old plugin);
//     without PLUGIN_MULTIPLEX_GRPC it serves plainly on the listener (the
//     benchmark's anchor);
//   - yamux.Server on the first accepted connection; each incoming stream
//     goes to the brokered listener of the most recent knock, else to the
//     main gRPC server (Health "plugin" SERVING, GRPCBroker, GRPCStdio,
//     GRPCController, proto.Counter);
//   - broker: a knock for an id it serves (GPMUXPLUGIN_SERVE_IDS, each a
//     Health server) is acked; a knock for another id gets no answer (as
//     go-plugin's, whose knock waits 5 s); Counter.Put dials add_server back:
//     knock, wait for the ack, session.OpenStream, AddHelper.Sum;
//   - StreamStdio sends one stderr message, then stdout "line 1".."line N"
//     (N = GPMUXPLUGIN_LINES, GPMUXPLUGIN_CHUNK lines per message), and
//     stays open until Shutdown;
//   - Controller/Shutdown: the open streams end with OK, the server stops
//     gracefully, a yamux GoAway, the session closes, exit 0.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"

	"rpcplugin-interop/kvshared"
	"rpcplugin-interop/muxclient"
)

func logf(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "gpmuxplugin: "+format+"\n", a...)
}

func die(err error) {
	logf("%v", err)
	os.Exit(1)
}

// chanListener is a net.Listener fed by the muxer (blockedServerListener).
type chanListener struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func newChanListener(addr net.Addr) *chanListener {
	return &chanListener{ch: make(chan net.Conn), done: make(chan struct{}), addr: addr}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, io.EOF
	}
}
func (l *chanListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

// give hands c to l unless l is closed.
func (l *chanListener) give(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

// plugin is the server side: muxer and broker.
type plugin struct {
	sess      *yamux.Session
	tls       *tls.Config
	main      *chanListener
	knockCh   chan uint32 // the id the next incoming stream goes to
	listeners map[uint32]*chanListener

	ready   chan struct{} // StartStream has begun
	once    sync.Once
	stream  grpc.ServerStream
	sendMu  sync.Mutex
	dialMu  sync.Mutex
	mu      sync.Mutex
	pending map[uint32]chan muxclient.ConnInfo

	quit     chan struct{}
	quitOnce sync.Once
}

// acceptLoop is GRPCServerMuxer.Accept: route each stream by the most
// recent knock, else to the main server.
func (p *plugin) acceptLoop() {
	for {
		c, err := p.sess.Accept()
		if err != nil {
			p.main.Close()
			return
		}
		select {
		case id := <-p.knockCh:
			p.listeners[id].give(c)
		default:
			p.main.give(c)
		}
	}
}

func (p *plugin) send(ci muxclient.ConnInfo) error {
	select {
	case <-p.ready:
	case <-time.After(5 * time.Second):
		return errors.New("no broker stream")
	}
	raw := ci.Marshal()
	p.sendMu.Lock()
	defer p.sendMu.Unlock()
	return p.stream.SendMsg(&raw)
}

// startStream is plugin.GRPCBroker/StartStream.
func (p *plugin) startStream(_ interface{}, st grpc.ServerStream) error {
	first := false
	p.once.Do(func() { p.stream = st; close(p.ready); first = true })
	if !first {
		return errors.New("gpmuxplugin: one broker stream only")
	}
	msgs := make(chan []byte)
	go func() {
		defer close(msgs)
		for {
			var raw []byte
			if st.RecvMsg(&raw) != nil {
				return
			}
			msgs <- raw
		}
	}()
	for {
		var raw []byte
		var ok bool
		select {
		case <-p.quit:
			return nil
		case raw, ok = <-msgs:
			if !ok {
				return nil
			}
		}
		ci, err := muxclient.UnmarshalConnInfo(raw)
		if err != nil || ci.Knock == nil {
			logf("broker: unexpected message %v (%v)", ci, err)
			continue
		}
		if ci.Knock.Knock && !ci.Knock.Ack {
			if _, ok := p.listeners[ci.ServiceID]; !ok {
				logf("broker: knock for id %d, which is not served: no answer", ci.ServiceID)
				continue
			}
			p.knockCh <- ci.ServiceID
			if err := p.send(muxclient.ConnInfo{ServiceID: ci.ServiceID,
				Knock: &muxclient.Knock{Knock: true, Ack: true}}); err != nil {
				logf("broker: ack: %v", err)
			}
			continue
		}
		p.mu.Lock()
		ch := p.pending[ci.ServiceID]
		p.mu.Unlock()
		if ch != nil {
			ch <- ci
		}
	}
}

// dial is GRPCBroker.Dial in multiplex mode, on the plugin side.
func (p *plugin) dial(id uint32) (*grpc.ClientConn, error) {
	return muxclient.DialGRPC(p.tls, func(context.Context, string) (net.Conn, error) {
		p.dialMu.Lock()
		defer p.dialMu.Unlock()
		ch := make(chan muxclient.ConnInfo, 1)
		p.mu.Lock()
		p.pending[id] = ch
		p.mu.Unlock()
		defer func() { p.mu.Lock(); delete(p.pending, id); p.mu.Unlock() }()
		if err := p.send(muxclient.ConnInfo{ServiceID: id, Knock: &muxclient.Knock{Knock: true}}); err != nil {
			return nil, err
		}
		select {
		case ci := <-ch:
			if !ci.Knock.Ack || ci.Knock.Error != "" {
				return nil, fmt.Errorf("failed to knock for id %d: %v", id, ci)
			}
		case <-time.After(5 * time.Second):
			return nil, fmt.Errorf("timeout waiting for multiplexing knock handshake on id %d", id)
		}
		return p.sess.OpenStream()
	})
}

// streamStdio is plugin.GRPCStdio/StreamStdio.
func (p *plugin) streamStdio(_ interface{}, st grpc.ServerStream) error {
	var in []byte
	if err := st.RecvMsg(&in); err != nil {
		return err
	}
	hello := muxclient.MarshalStdioData(muxclient.StdioStderr, []byte("gpmuxplugin: stdio open\n"))
	if err := st.SendMsg(&hello); err != nil {
		return err
	}
	n, _ := strconv.Atoi(os.Getenv("GPMUXPLUGIN_LINES"))
	chunk, _ := strconv.Atoi(os.Getenv("GPMUXPLUGIN_CHUNK"))
	if chunk < 1 {
		chunk = 1
	}
	var buf []byte
	for i := 1; i <= n; i++ {
		buf = append(buf, "line "+strconv.Itoa(i)+"\n"...)
		if i%chunk == 0 || i == n {
			m := muxclient.MarshalStdioData(muxclient.StdioStdout, buf)
			if err := st.SendMsg(&m); err != nil {
				return err
			}
			buf = buf[:0]
		}
	}
	select {
	case <-p.quit:
	case <-st.Context().Done():
	}
	return nil
}

// counter is an in-memory Counter.
type counter struct {
	mu sync.Mutex
	m  map[string]int64
}

func (c *counter) Put(ctx context.Context, key string, v int64, a kvshared.AddHelper) error {
	c.mu.Lock()
	old := c.m[key]
	c.mu.Unlock()
	r, err := a.Sum(ctx, old, v)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.m[key] = r
	c.mu.Unlock()
	return nil
}

func (c *counter) Get(key string) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[key]
	if !ok {
		return 0, fmt.Errorf("open kv_%s: no such file or directory", key)
	}
	return v, nil
}

func main() {
	if os.Getenv("BASIC_PLUGIN") != "hello" {
		fmt.Fprintln(os.Stderr, "This binary is a plugin. These are not meant to be executed directly.")
		os.Exit(1)
	}
	dir, err := os.MkdirTemp(os.Getenv("PLUGIN_UNIX_SOCKET_DIR"), "gpmuxplugin-")
	if err != nil {
		die(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "plugin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		die(err)
	}

	p := &plugin{knockCh: make(chan uint32, 1), listeners: map[uint32]*chanListener{},
		ready: make(chan struct{}), pending: map[uint32]chan muxclient.ConnInfo{}, quit: make(chan struct{})}
	cert := ""
	if pem := os.Getenv("PLUGIN_CLIENT_CERT"); pem != "" { // AutoMTLS, as go-plugin's Serve
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(pem)) {
			die(errors.New("PLUGIN_CLIENT_CERT holds no certificate"))
		}
		cp, kp, err := muxclient.GenerateCert()
		if err != nil {
			die(err)
		}
		c, err := tls.X509KeyPair(cp, kp)
		if err != nil {
			die(err)
		}
		p.tls = &tls.Config{Certificates: []tls.Certificate{c}, ClientAuth: tls.RequireAndVerifyClientCert,
			ClientCAs: pool, RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
		cert = base64.RawStdEncoding.EncodeToString(c.Certificate[0])
	}
	mux, _ := strconv.ParseBool(os.Getenv("PLUGIN_MULTIPLEX_GRPC"))
	line := fmt.Sprintf("1|1|unix|%s|grpc|%s", path, cert)
	if os.Getenv("PLUGIN_MULTIPLEX_GRPC") != "" && os.Getenv("GPMUXPLUGIN_NO_MUX") == "" {
		line += "|true"
	}
	plain := os.Getenv("PLUGIN_MULTIPLEX_GRPC") == ""
	if !plain && (!mux || os.Getenv("GPMUXPLUGIN_NO_MUX") != "") {
		fmt.Println(line)
		logf("not multiplexing: waiting to be killed")
		time.Sleep(60 * time.Second)
		os.Exit(1)
	}

	var opts []grpc.ServerOption
	if p.tls != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(p.tls)))
	}
	srv := kvshared.NewServer(opts)
	hs := health.NewServer()
	hs.SetServingStatus("plugin", grpc_health_v1.HealthCheckResponse_SERVING)
	grpc_health_v1.RegisterHealthServer(srv, hs)
	srv.RegisterService(&grpc.ServiceDesc{ServiceName: "plugin.GRPCBroker", HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{StreamName: "StartStream", Handler: p.startStream,
			ServerStreams: true, ClientStreams: true}}}, p)
	srv.RegisterService(&grpc.ServiceDesc{ServiceName: "plugin.GRPCStdio", HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{StreamName: "StreamStdio", Handler: p.streamStdio, ServerStreams: true}}}, p)
	srv.RegisterService(&grpc.ServiceDesc{ServiceName: "plugin.GRPCController", HandlerType: (*interface{})(nil),
		Methods: []grpc.MethodDesc{{MethodName: "Shutdown", Handler: func(_ interface{}, _ context.Context,
			dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
			var in []byte
			if err := dec(&in); err != nil {
				return nil, err
			}
			p.quitOnce.Do(func() { close(p.quit) })
			out := []byte{}
			return &out, nil
		}}}}, p)
	kvshared.RegisterCounter(srv, &counter{m: map[string]int64{}}, p.dial)

	fmt.Println(line) // the handshake
	if plain {
		// Not asked to multiplex: the main server on the listener, as any
		// go-plugin plugin (the benchmark's anchor, bench/run.py W9).
		go srv.Serve(ln)
		<-p.quit
		srv.GracefulStop()
		os.RemoveAll(dir)
		os.Exit(0)
	}
	conn, err := ln.Accept()
	ln.Close()
	if err != nil {
		die(err)
	}
	p.sess, err = yamux.Server(conn, yamux.DefaultConfig())
	if err != nil {
		die(err)
	}
	p.main = newChanListener(p.sess.Addr())
	var brokered []*grpc.Server
	for _, s := range strings.Split(os.Getenv("GPMUXPLUGIN_SERVE_IDS"), ",") {
		id, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			continue
		}
		l := newChanListener(p.sess.Addr())
		p.listeners[uint32(id)] = l
		bs := grpc.NewServer(opts...)
		grpc_health_v1.RegisterHealthServer(bs, health.NewServer())
		brokered = append(brokered, bs)
		go bs.Serve(l)
	}
	go p.acceptLoop()
	go srv.Serve(p.main)

	select {
	case <-p.quit:
	case <-p.sess.CloseChan():
		logf("session closed by the client")
	}
	for _, bs := range brokered {
		bs.Stop()
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(2 * time.Second):
		logf("graceful stop took over 2 s: stopping")
		srv.Stop()
	}
	p.sess.GoAway()
	p.sess.Close()
	os.RemoveAll(dir)
	os.Exit(0)
}
