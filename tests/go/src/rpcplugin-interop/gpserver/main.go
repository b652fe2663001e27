// gpserver is a go-plugin v1.0.1 plugin (server) serving one trivial gRPC
// plugin ("interop") with plugin.Serve and plugin.DefaultGRPCServer: the
// go-plugin anchor for the benchmarks (exec -> handshake line, Shutdown ->
// exit, broker round trips) and the counterpart of "gpclient launch".
//
//	gpserver [FLAGS]      (started by a go-plugin client, with its magic cookie)
//
// Its own reports go to the original stderr as "gpserver: ..." lines (a
// go-plugin client logs them; gpclient prints them as "PLUGIN_STDERR ...").
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"

	"rpcplugin-interop/common"
)

// The process's real stdout/stderr: plugin.Serve replaces os.Stdout and
// os.Stderr with pipes after the handshake line.
var (
	origStdout = os.Stdout
	origStderr = os.Stderr
	errMu      sync.Mutex
)

func report(format string, args ...interface{}) {
	errMu.Lock()
	fmt.Fprintf(origStderr, "gpserver: "+format+"\n", args...)
	errMu.Unlock()
}

func main() {
	fs := flag.NewFlagSet("gpserver", flag.ExitOnError)
	cookie := fs.String("magic-cookie",
		common.DefaultCookieKey+"="+common.DefaultCookieValue,
		"handshake magic cookie KEY=VALUE")
	appVersion := fs.Uint("app-version", common.DefaultAppVersion, "application protocol version")
	logLevel := fs.String("log-level", "info", "go-plugin server log level (JSON on stderr)")
	stdoutLines := fs.Int("stdout-lines", 0,
		"after the first RPC (so after the handshake and go-plugin's stdout swap), write N lines "+
			"of 64 bytes to stdout")
	stdoutRaw := fs.Bool("stdout-raw", false,
		"write those lines to the original fd 1 (the client's handshake pipe) instead of "+
			"go-plugin's replacement os.Stdout")
	stdoutDeadline := fs.Duration("stdout-deadline", 2*time.Second,
		"write deadline for the whole batch of lines")
	brokerServe := fs.Int("broker-serve", 0,
		"AcceptAndServe broker ids 1..N, each with a health server (gpclient launch --broker-dial N)")
	dialBack := fs.Int("broker-dial-back", 0,
		"broker.Dial ids 101..100+N and Health/Check each (gpclient launch --broker-accept N)")
	dialBackFor := fs.Duration("dial-back-for", 30*time.Second,
		"keep retrying each dial-back (go-plugin's Dial waits 5 s per attempt) this long")
	fs.Parse(os.Args[1:])
	k, v, err := common.ParseCookie(*cookie)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}

	p := &common.InteropPlugin{OnServer: func(b *plugin.GRPCBroker, s *grpc.Server) {
		for i := 1; i <= *brokerServe; i++ {
			go serveID(b, uint32(i))
		}
		for i := 0; i < *dialBack; i++ {
			go dialID(b, uint32(101+i), *dialBackFor)
		}
	}}

	server := plugin.DefaultGRPCServer
	if *stdoutLines > 0 {
		// The first RPC of any kind can only arrive after Serve printed the
		// handshake and swapped os.Stdout (it starts the gRPC server after
		// the swap), so that is when the lines are written.
		var once sync.Once
		start := func() {
			once.Do(func() { go writeLines(*stdoutLines, *stdoutRaw, *stdoutDeadline) })
		}
		server = func(opts []grpc.ServerOption) *grpc.Server {
			opts = append(opts,
				grpc.ChainUnaryInterceptor(func(ctx context.Context, req interface{},
					info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (interface{}, error) {
					start()
					return h(ctx, req)
				}),
				grpc.ChainStreamInterceptor(func(srv interface{}, ss grpc.ServerStream,
					info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
					start()
					return h(srv, ss)
				}))
			return plugin.DefaultGRPCServer(opts)
		}
	}

	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: plugin.HandshakeConfig{
			ProtocolVersion:  *appVersion,
			MagicCookieKey:   k,
			MagicCookieValue: v,
		},
		Plugins:    plugin.PluginSet{common.PluginName: p},
		GRPCServer: server,
		Logger:     common.Logger("gpserver", *logLevel),
	})
	report("exit 0")
}

// serveID: AcceptAndServe(id) with a health server.  Blocks (in go-plugin)
// until a broker stream is open, and serves until the broker closes.
func serveID(b *plugin.GRPCBroker, id uint32) {
	served := false
	b.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
		s := grpc.NewServer(opts...)
		grpc_health_v1.RegisterHealthServer(s, health.NewServer())
		report("accept id=%d sent", id)
		served = true
		return s
	})
	if !served {
		report("accept id=%d failed (AcceptAndServe returned without sending)", id)
	}
}

// dialID: broker.Dial(id), retried while for lasts, then Health/Check.
func dialID(b *plugin.GRPCBroker, id uint32, for_ time.Duration) {
	deadline := time.Now().Add(for_)
	for attempt := 1; ; attempt++ {
		conn, err := b.Dial(id)
		if err != nil {
			if time.Now().After(deadline) {
				report("dial-back id=%d error=%q attempts=%d", id, err.Error(), attempt)
				return
			}
			continue
		}
		st, err := common.HealthCheck(conn, "", 10*time.Second)
		conn.Close()
		if err != nil {
			report("dial-back id=%d error=%q", id, err.Error())
		} else {
			report("dial-back id=%d status=%s", id, st)
		}
		return
	}
}

// writeLines writes n lines of 64 bytes ("%08d", filler, '\n').  go-plugin
// v1.0.1 never reads the pipe it puts behind os.Stdout, so without
// --stdout-raw the writes stop once the pipe buffer (64 KiB) is full; the
// deadline turns that into a report instead of a hang.
func writeLines(n int, raw bool, d time.Duration) {
	out, where := os.Stdout, "os.Stdout (go-plugin's pipe)"
	if raw {
		out, where = origStdout, "fd 1 (handshake pipe)"
	}
	if out == origStdout && !raw {
		report("stdout-lines: os.Stdout was not replaced")
	}
	filler := strings.Repeat("abcdefghijklmnopqrstuvwxyz", 3)[:64-8-1]
	t0 := time.Now()
	dlErr := out.SetWriteDeadline(t0.Add(d))
	written := 0
	var werr error
	for i := 0; i < n; i++ {
		if _, werr = fmt.Fprintf(out, "%08d%s\n", i, filler); werr != nil {
			break
		}
		written++
	}
	if dlErr != nil {
		report("stdout-lines: no write deadline on %s: %v", where, dlErr)
	}
	if werr != nil {
		report("stdout-lines to=%s written=%d of=%d elapsed_ms=%s error=%q",
			where, written, n, common.Ms(time.Since(t0)), werr.Error())
	} else {
		report("stdout-lines to=%s written=%d of=%d elapsed_ms=%s",
			where, written, n, common.Ms(time.Since(t0)))
	}
}
