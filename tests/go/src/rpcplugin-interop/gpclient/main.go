// gpclient is a go-plugin v1.0.1 client (HashiCorp's own client code, as
// packaged by Debian) used to test rpcplugin against the real thing.
//
//	gpclient reattach [FLAGS] NETWORK ADDRESS
//	gpclient launch   [FLAGS] -- COMMAND [ARG...]
//
// Every step prints one result line on stdout; a failed step prints
// "FAIL <step>: <error>" and the program exits 1.  Every wait is bounded.
// Run "gpclient reattach -h" or "gpclient launch -h" for the flags.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"

	"rpcplugin-interop/common"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  gpclient reattach [FLAGS] NETWORK ADDRESS   connect to a running plugin server
  gpclient launch   [FLAGS] -- COMMAND [ARG...] start a plugin the go-plugin way
run "gpclient SUBCOMMAND -h" for the flags
`)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "reattach":
		reattachMain(os.Args[2:])
	case "launch":
		launchMain(os.Args[2:])
	default:
		usage()
	}
}

// common flags
type baseFlags struct {
	cookie     string
	appVersion uint
	timeout    time.Duration
	logLevel   string
}

func (b *baseFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&b.cookie, "magic-cookie",
		common.DefaultCookieKey+"="+common.DefaultCookieValue,
		"handshake magic cookie KEY=VALUE")
	fs.UintVar(&b.appVersion, "app-version", common.DefaultAppVersion,
		"application protocol version")
	fs.DurationVar(&b.timeout, "timeout", 10*time.Second,
		"bound for each step (Ping, Dial, Health/Check, waits)")
	fs.StringVar(&b.logLevel, "log-level", "info",
		"go-plugin client log level on stderr (trace|debug|info|warn|error)")
}

func (b *baseFlags) handshake() plugin.HandshakeConfig {
	k, v, err := common.ParseCookie(b.cookie)
	if err != nil {
		common.Fail("flags", err)
	}
	return plugin.HandshakeConfig{
		ProtocolVersion:  b.appVersion,
		MagicCookieKey:   k,
		MagicCookieValue: v,
	}
}

func pluginSet() plugin.PluginSet {
	return plugin.PluginSet{common.PluginName: &common.InteropPlugin{}}
}

// connect: Client() (dials, starts the broker stream), Ping, Dispense.
func connect(client *plugin.Client, timeout time.Duration) (plugin.ClientProtocol, *common.Handle) {
	var rpc plugin.ClientProtocol
	err := common.Within(timeout, func() error {
		var err error
		rpc, err = client.Client()
		return err
	})
	if err != nil {
		common.Fail("client", err)
	}
	t0 := time.Now()
	if err := common.Within(timeout, rpc.Ping); err != nil {
		common.Fail("ping", err)
	}
	common.Say("PING OK %s", common.Ms(time.Since(t0)))
	var raw interface{}
	err = common.Within(timeout, func() error {
		var err error
		raw, err = rpc.Dispense(common.PluginName)
		return err
	})
	if err != nil {
		common.Fail("dispense", err)
	}
	h, ok := raw.(*common.Handle)
	if !ok {
		common.Fail("dispense", fmt.Errorf("unexpected type %T", raw))
	}
	common.Say("DISPENSED %s", common.PluginName)
	return rpc, h
}

// acceptServe runs broker.AcceptAndServe(id) with a health server (SERVING
// for "") and waits until the peer made one Health/Check call over it.
// Prints "ACCEPTING <id>" once the ConnInfo went out on the broker stream
// (AcceptAndServe calls the server factory only after Accept's Send), then
// "ACCEPT_SERVED <id> <method>".
func acceptServe(b *plugin.GRPCBroker, id uint32, timeout time.Duration) {
	counter := common.NewCallCounter()
	accepting := make(chan struct{})
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		b.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
			opts = append(opts, grpc.UnaryInterceptor(counter.Unary))
			s := grpc.NewServer(opts...)
			grpc_health_v1.RegisterHealthServer(s, health.NewServer())
			close(accepting)
			return s
		})
	}()
	select {
	case <-accepting:
		common.Say("ACCEPTING %d", id)
	case <-returned:
		// AcceptAndServe only logs its errors (to the standard logger, on
		// stderr): typically "broker closed" when StartStream failed.
		common.Fail("accept "+strconv.Itoa(int(id)),
			errors.New("AcceptAndServe returned without sending the ConnInfo (broker stream down? see stderr)"))
	case <-time.After(timeout):
		common.Fail("accept "+strconv.Itoa(int(id)),
			errors.New("ConnInfo not sent on the broker stream within "+timeout.String()))
	}
	select {
	case m := <-counter.Calls:
		common.Say("ACCEPT_SERVED %d %s", id, m)
	case <-time.After(timeout):
		common.Fail("accept "+strconv.Itoa(int(id)),
			errors.New("no call over the brokered connection within "+timeout.String()))
	}
}

// dialHealth runs broker.Dial(id) (go-plugin waits up to 5 s for the peer's
// ConnInfo) and calls Health/Check over the connection.
func dialHealth(b *plugin.GRPCBroker, id uint32, timeout time.Duration) {
	what := "dial " + strconv.Itoa(int(id))
	common.Say("DIALING %d", id)
	t0 := time.Now()
	var conn *grpc.ClientConn
	err := common.Within(timeout, func() error {
		var err error
		conn, err = b.Dial(id)
		return err
	})
	if err != nil {
		common.Fail(what, err)
	}
	defer conn.Close()
	st, err := common.HealthCheck(conn, "", timeout)
	if err != nil {
		common.Fail(what, err)
	}
	common.Say("DIAL_HEALTH %d %s %s", id, st.String(), common.Ms(time.Since(t0)))
	if st != grpc_health_v1.HealthCheckResponse_SERVING {
		common.Fail(what, fmt.Errorf("status %s, expected SERVING", st))
	}
}

// ---------------------------------------------------------------- reattach

func reattachMain(args []string) {
	fs := flag.NewFlagSet("reattach", flag.ExitOnError)
	var b baseFlags
	b.add(fs)
	pid := fs.Int("pid", 0, "pid of the plugin server process (required)")
	acceptID := fs.Uint("accept-id", 0,
		"AcceptAndServe this broker id with a health server, wait for one call over it")
	dialID := fs.Uint("dial-id", 0,
		"broker.Dial this id and call Health/Check over it")
	hold := fs.Bool("hold", false,
		"after the steps print HOLDING and wait for a line (or EOF) on stdin")
	holdTimeout := fs.Duration("hold-timeout", 60*time.Second, "bound for --hold")
	exitMode := fs.String("exit", "close",
		"at the end: close (GRPCClient.Close: broker close, Controller/Shutdown), "+
			"kill (Client.Kill: Shutdown, 2 s grace, then SIGKILL of the pid), "+
			"none (just close the connection)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: gpclient reattach [FLAGS] NETWORK ADDRESS\n")
		fs.PrintDefaults()
	}
	fs.Parse(args)
	if fs.NArg() != 2 || *pid <= 0 {
		fs.Usage()
		os.Exit(2)
	}
	network, address := fs.Arg(0), fs.Arg(1)
	var addr net.Addr
	var err error
	switch network {
	case "unix":
		addr, err = net.ResolveUnixAddr("unix", address)
	case "tcp":
		addr, err = net.ResolveTCPAddr("tcp", address)
	default:
		err = fmt.Errorf("network %q: expected unix or tcp", network)
	}
	if err != nil {
		common.Fail("address", err)
	}
	if *exitMode != "close" && *exitMode != "kill" && *exitMode != "none" {
		common.Fail("flags", fmt.Errorf("--exit %q: expected close, kill or none", *exitMode))
	}

	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  b.handshake(),
		Plugins:          pluginSet(),
		Reattach:         &plugin.ReattachConfig{Protocol: plugin.ProtocolGRPC, Addr: addr, Pid: *pid},
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           common.Logger("gpclient", b.logLevel),
	})
	var got net.Addr
	err = common.Within(b.timeout, func() error {
		var err error
		got, err = client.Start()
		return err
	})
	if err != nil {
		common.Fail("reattach", err)
	}
	common.Say("CONNECTED %s %s", got.Network(), got.String())
	rpc, h := connect(client, b.timeout)

	if *acceptID != 0 {
		acceptServe(h.Broker, uint32(*acceptID), b.timeout)
	}
	if *dialID != 0 {
		dialHealth(h.Broker, uint32(*dialID), b.timeout)
	}
	if *hold {
		common.Say("HOLDING")
		line := make(chan struct{})
		go func() {
			bufio.NewReader(os.Stdin).ReadString('\n')
			close(line)
		}()
		select {
		case <-line:
		case <-time.After(*holdTimeout):
			common.Fail("hold", errors.New("no line on stdin within "+holdTimeout.String()))
		}
	}
	switch *exitMode {
	case "close":
		t0 := time.Now()
		if err := common.Within(b.timeout, rpc.Close); err != nil {
			common.Fail("close", err)
		}
		common.Say("CLOSE OK %s", common.Ms(time.Since(t0)))
	case "kill":
		t0 := time.Now()
		if err := common.Within(b.timeout, func() error { client.Kill(); return nil }); err != nil {
			common.Fail("kill", err)
		}
		common.Say("KILL elapsed_ms=%s", common.Ms(time.Since(t0)))
	case "none":
		h.Conn.Close()
	}
	common.Say("DONE")
}

// ---------------------------------------------------------------- launch

type stdioResult struct {
	messages, bytes, lines int
	err                    error
}

// stdioReader opens its own connection to the plugin's address (v1.0.1 has
// no GRPCStdio client) and reads /plugin.GRPCStdio/StreamStdio.
type stdioReader struct {
	print bool
	mu    sync.Mutex
	res   stdioResult
	cond  chan struct{} // signalled (non-blocking) on every message
	done  chan struct{}
}

func startStdio(addr net.Addr, tlsCfg *credentials.TransportCredentials, print bool, timeout time.Duration) (*stdioReader, error) {
	opts := []grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, addr.Network(), addr.String())
		}),
	}
	if tlsCfg != nil {
		opts = append(opts, grpc.WithTransportCredentials(*tlsCfg))
	} else {
		opts = append(opts, grpc.WithInsecure())
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := grpc.DialContext(ctx, "passthrough:///plugin", append(opts, grpc.WithBlock())...)
	if err != nil {
		return nil, err
	}
	stream, err := conn.NewStream(context.Background(),
		&grpc.StreamDesc{ServerStreams: true}, "/plugin.GRPCStdio/StreamStdio",
		grpc.ForceCodec(common.RawCodec{}))
	if err != nil {
		conn.Close()
		return nil, err
	}
	empty := []byte{}
	if err := stream.SendMsg(&empty); err != nil {
		conn.Close()
		return nil, err
	}
	if err := stream.CloseSend(); err != nil {
		conn.Close()
		return nil, err
	}
	r := &stdioReader{print: print, cond: make(chan struct{}, 1), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		defer conn.Close()
		for {
			var buf []byte
			err := stream.RecvMsg(&buf)
			if err != nil {
				r.mu.Lock()
				r.res.err = err
				r.mu.Unlock()
				return
			}
			m, err := common.DecodeStdioData(buf)
			if err != nil {
				r.mu.Lock()
				r.res.err = fmt.Errorf("undecodable StdioData: %v", err)
				r.mu.Unlock()
				return
			}
			if r.print {
				common.Say("STDIO %s %s", common.ChannelName(m.Channel), strconv.Quote(string(m.Data)))
			}
			r.mu.Lock()
			r.res.messages++
			r.res.bytes += len(m.Data)
			for _, c := range m.Data {
				if c == '\n' {
					r.res.lines++
				}
			}
			r.mu.Unlock()
			select {
			case r.cond <- struct{}{}:
			default:
			}
		}
	}()
	return r, nil
}

func (r *stdioReader) snapshot() stdioResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.res
}

// waitLines waits until at least n newline bytes arrived, or d passes.
func (r *stdioReader) waitLines(n int, d time.Duration) bool {
	deadline := time.After(d)
	for {
		if r.snapshot().lines >= n {
			return true
		}
		select {
		case <-r.cond:
		case <-r.done:
			return r.snapshot().lines >= n
		case <-deadline:
			return false
		}
	}
}

func launchMain(args []string) {
	fs := flag.NewFlagSet("launch", flag.ExitOnError)
	var b baseFlags
	b.add(fs)
	autoMTLS := fs.Bool("automtls", false, "ClientConfig.AutoMTLS (v1.0.1 supports it)")
	startTimeout := fs.Duration("start-timeout", 20*time.Second,
		"ClientConfig.StartTimeout: wait for the handshake line")
	killTimeout := fs.Duration("kill-timeout", 10*time.Second,
		"watchdog for Client.Kill (which has its own 2 s grace period)")
	stdio := fs.Bool("stdio", false,
		"read /plugin.GRPCStdio/StreamStdio on an own connection to the handshake address")
	stdioPrint := fs.Bool("stdio-print", false,
		`print every StdioData as: STDIO STDOUT|STDERR "<Go-quoted bytes>"`)
	stdioLines := fs.Int("stdio-expect-lines", 0,
		"before Kill, wait (bounded by --timeout) until this many newline bytes arrived over StreamStdio")
	brokerDial := fs.Int("broker-dial", 0,
		"broker.Dial ids 1..N and Health/Check each (needs a plugin that serves them: gpserver --broker-serve N)")
	brokerAccept := fs.Int("broker-accept", 0,
		"AcceptAndServe ids 101..100+N and wait for a call on each (gpserver --broker-dial-back N)")
	waitStderr := fs.String("wait-plugin-stderr", "",
		"before Kill, wait (bounded by --timeout) for a line of the plugin's stderr containing this")
	holdBeforeKill := fs.Duration("hold", 0, "sleep this long before Kill (for manual inspection only)")
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: gpclient launch [FLAGS] -- COMMAND [ARG...]\n")
		fs.PrintDefaults()
	}
	fs.Parse(args)
	if fs.NArg() < 1 {
		fs.Usage()
		os.Exit(2)
	}
	cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
	stderrSeen := make(chan struct{})
	var seenOnce sync.Once
	stderrW := &common.PrefixWriter{Prefix: "PLUGIN_STDERR "}
	if *waitStderr != "" {
		stderrW.OnLine = func(line string) {
			if strings.Contains(line, *waitStderr) {
				seenOnce.Do(func() { close(stderrSeen) })
			}
		}
	}
	cfg := &plugin.ClientConfig{
		HandshakeConfig:  b.handshake(),
		Plugins:          pluginSet(),
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         *autoMTLS,
		StartTimeout:     *startTimeout,
		Stderr:           stderrW,
		Logger:           common.Logger("gpclient", b.logLevel),
	}
	client := plugin.NewClient(cfg)
	// A failed step never leaves the plugin behind (SIGKILL; Fail exits
	// right after, so there is no graceful path to wait for).
	common.Cleanup = func() {
		if cmd.Process != nil {
			cmd.Process.Kill()
		}
	}

	t0 := time.Now()
	var addr net.Addr
	err := common.Within(*startTimeout+5*time.Second, func() error {
		var err error
		addr, err = client.Start()
		return err
	})
	if err != nil {
		common.Fail("start", err)
	}
	common.Say("HANDSHAKE network=%s address=%s protocol=%s version=%d tls=%t pid=%d elapsed_ms=%s",
		addr.Network(), addr.String(), client.Protocol(), client.NegotiatedVersion(),
		cfg.TLSConfig != nil, cmd.Process.Pid, common.Ms(time.Since(t0)))
	if *autoMTLS && (cfg.TLSConfig == nil || cfg.TLSConfig.RootCAs == nil) {
		killQuietly(client, cmd, *killTimeout)
		common.Fail("automtls", errors.New("the handshake line carried no server certificate"))
	}

	var sr *stdioReader
	if *stdio {
		var creds *credentials.TransportCredentials
		if cfg.TLSConfig != nil {
			c := credentials.NewTLS(cfg.TLSConfig.Clone())
			creds = &c
		}
		sr, err = startStdio(addr, creds, *stdioPrint, b.timeout)
		if err != nil {
			killQuietly(client, cmd, *killTimeout)
			common.Fail("stdio", err)
		}
		common.Say("STDIO_OPEN")
	}

	_, h := connect(client, b.timeout)
	common.Say("BROKER_STREAM started")

	var wg sync.WaitGroup
	for i := 0; i < *brokerAccept; i++ {
		id := uint32(101 + i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			acceptServe(h.Broker, id, b.timeout)
		}()
	}
	for i := 1; i <= *brokerDial; i++ {
		dialHealth(h.Broker, uint32(i), b.timeout)
	}
	wg.Wait()

	if sr != nil && *stdioLines > 0 {
		if !sr.waitLines(*stdioLines, b.timeout) {
			res := sr.snapshot()
			killQuietly(client, cmd, *killTimeout)
			common.Fail("stdio", fmt.Errorf("got %d of %d lines (%d messages, %d bytes, err=%v)",
				res.lines, *stdioLines, res.messages, res.bytes, res.err))
		}
		common.Say("STDIO_LINES %d", sr.snapshot().lines)
	}
	if *waitStderr != "" {
		select {
		case <-stderrSeen:
			common.Say("PLUGIN_STDERR_SEEN %s", strconv.Quote(*waitStderr))
		case <-time.After(b.timeout):
			common.Fail("wait-plugin-stderr", fmt.Errorf("no stderr line containing %q within %v",
				*waitStderr, b.timeout))
		}
	}
	if *holdBeforeKill > 0 {
		time.Sleep(*holdBeforeKill)
	}

	t1 := time.Now()
	err = common.Within(*killTimeout, func() error { client.Kill(); return nil })
	elapsed := time.Since(t1)
	if err != nil {
		cmd.Process.Kill()
		common.Fail("kill", err)
	}
	// Kill waited for go-plugin's goroutine that ran cmd.Wait.
	st := cmd.ProcessState
	exitCode, sig := -1, "none"
	graceful := false
	if st != nil {
		if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			sig = ws.Signal().String()
		} else {
			exitCode = st.ExitCode()
			graceful = true
		}
	}
	common.Say("KILL elapsed_ms=%s graceful=%t exit_code=%d signal=%q exited=%t",
		common.Ms(elapsed), graceful, exitCode, sig, client.Exited())

	if sr != nil {
		select {
		case <-sr.done:
		case <-time.After(b.timeout):
		}
		res := sr.snapshot()
		status := "OK"
		if res.err == nil {
			status = "STILL_OPEN"
		} else if res.err != io.EOF {
			status = strconv.Quote(res.err.Error())
		}
		common.Say("STDIO_END messages=%d bytes=%d lines=%d status=%s",
			res.messages, res.bytes, res.lines, status)
	}
	common.Say("DONE")
}

func killQuietly(client *plugin.Client, cmd *exec.Cmd, d time.Duration) {
	if common.Within(d, func() error { client.Kill(); return nil }) != nil && cmd.Process != nil {
		cmd.Process.Kill()
	}
}
