// gpmuxbench measures what go-plugin's gRPC broker multiplexing costs on
// rpcplugin-host (docs/benchmarks.md, W9): the same client, the same plugin,
// the same workload, once over a plain connection and once multiplexed (the
// plugin started with PLUGIN_MULTIPLEX_GRPC=true, one connection, yamux, the
// main gRPC connection on a stream, as go-plugin v1.8.0's client does; see
// package muxclient).
//
//	gpmuxbench stdio [--mux] [--automtls] --plugin CMD --bytes N
//	    open StreamStdio at once and read until N bytes of stdout data
//	    arrived (the plugin's child prints them); prints
//	    {"messages":..,"bytes":..,"seconds":..,"msgs_per_s":..,"mb_per_s":..}
//	    timed from the first message to the last byte.
//	gpmuxbench unary [--mux] [--automtls] --plugin CMD --calls N [--warmup W]
//	    go-plugin's KV example: W untimed, then N timed Put calls of a
//	    64-byte value from one goroutine; prints
//	    {"calls":..,"seconds":..,"calls_per_s":..,"p50_us":..,"p99_us":..}
//	gpmuxbench health [...]
//	    the same with grpc.health.v1.Health/Check "plugin" (no file I/O
//	    in the handler: the transport's share of a call shows)
//
// The plugin is killed at the end (after Shutdown).  Any failure prints
// "FAIL <what>: <error>" on stderr and exits 1.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"rpcplugin-interop/kvshared"
	"rpcplugin-interop/muxclient"
)

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", what, err)
	os.Exit(1)
}

type plugin struct {
	cmd  *exec.Cmd
	conn *grpc.ClientConn
	mux  *muxclient.Muxer
}

// start launches CMD as a go-plugin client does (cookie BASIC_PLUGIN=hello,
// version 1), with or without multiplexing, and connects.
func start(command string, mux, automtls bool) *plugin {
	cmd := exec.Command("sh", "-c", command)
	cmd.Env = append(os.Environ(), "BASIC_PLUGIN=hello",
		"PLUGIN_PROTOCOL_VERSIONS=1")
	if mux {
		cmd.Env = append(cmd.Env, "PLUGIN_MULTIPLEX_GRPC=true")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var tlsCfg *tls.Config
	if automtls {
		certPEM, keyPEM, err := muxclient.GenerateCert()
		if err != nil {
			fail("cert", err)
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			fail("cert", err)
		}
		cmd.Env = append(cmd.Env, "PLUGIN_CLIENT_CERT="+string(certPEM))
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert},
			MinVersion: tls.VersionTLS12, ServerName: "localhost"}
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		fail("pipe", err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		fail("start", err)
	}
	p := &plugin{cmd: cmd}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		p.kill()
		fail("handshake", err)
	}
	parts := strings.Split(strings.TrimSpace(line), "|")
	if len(parts) < 5 {
		p.kill()
		fail("handshake", fmt.Errorf("bad line %q", line))
	}
	if tlsCfg != nil {
		der, err := base64.RawStdEncoding.DecodeString(parts[5])
		if err != nil {
			fail("server cert", err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			fail("server cert", err)
		}
		pool := x509.NewCertPool()
		pool.AddCert(c)
		tlsCfg.RootCAs = pool
	}
	if mux {
		h, err := muxclient.ParseHandshake(line)
		if err != nil {
			p.kill()
			fail("handshake", err)
		}
		m, conn, _, err := muxclient.Connect(h, tlsCfg, func(string, ...interface{}) {})
		if err != nil {
			p.kill()
			fail("connect", err)
		}
		p.mux, p.conn = m, conn
		return p
	}
	network, address := parts[2], parts[3]
	conn, err := muxclient.DialGRPC(tlsCfg, func(ctx context.Context, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	})
	if err != nil {
		p.kill()
		fail("connect", err)
	}
	p.conn = conn
	return p
}

func (p *plugin) kill() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if p.conn != nil {
		var out []byte
		in := []byte{}
		_ = p.conn.Invoke(ctx, "/plugin.GRPCController/Shutdown", &in, &out,
			grpc.ForceCodec(kvshared.RawCodec{}))
		p.conn.Close()
	}
	if p.mux != nil {
		p.mux.Close()
	}
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

func stdio(p *plugin, want int64) map[string]interface{} {
	st, err := p.conn.NewStream(context.Background(),
		&grpc.StreamDesc{StreamName: "StreamStdio", ServerStreams: true},
		"/plugin.GRPCStdio/StreamStdio", grpc.ForceCodec(kvshared.RawCodec{}))
	if err != nil {
		fail("StreamStdio", err)
	}
	empty := []byte{}
	if err := st.SendMsg(&empty); err != nil {
		fail("StreamStdio send", err)
	}
	if err := st.CloseSend(); err != nil {
		fail("StreamStdio close", err)
	}
	var got, msgs int64
	var t0 time.Time
	for got < want {
		var m []byte
		if err := st.RecvMsg(&m); err != nil {
			fail("StreamStdio recv", fmt.Errorf("after %d of %d bytes: %v", got, want, err))
		}
		if msgs == 0 {
			t0 = time.Now()
		}
		msgs++
		got += int64(stdoutBytes(m))
	}
	secs := time.Since(t0).Seconds()
	return map[string]interface{}{"messages": msgs, "bytes": got, "seconds": secs,
		"msgs_per_s": float64(msgs) / secs, "mb_per_s": float64(got) / secs / 1e6}
}

// stdoutBytes: the length of StdioData.data (field 2) when channel
// (field 1) is 1 (STDOUT); 0 otherwise.
func stdoutBytes(m []byte) int {
	channel, n := 0, 0
	for i := 0; i < len(m); {
		key := int(m[i])
		i++
		switch key {
		case 0x08: // channel, varint
			v := 0
			for shift := 0; i < len(m); shift += 7 {
				b := m[i]
				i++
				v |= int(b&0x7f) << shift
				if b < 0x80 {
					break
				}
			}
			channel = v
		case 0x12: // data, length-delimited
			l := 0
			for shift := 0; i < len(m); shift += 7 {
				b := m[i]
				i++
				l |= int(b&0x7f) << shift
				if b < 0x80 {
					break
				}
			}
			n = l
			i += l
		default:
			return 0
		}
	}
	if channel == 1 {
		return n
	}
	return 0
}

func unary(p *plugin, method string, req []byte, calls, warmup int) map[string]interface{} {
	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var out []byte
		return p.conn.Invoke(ctx, method, &req, &out,
			grpc.ForceCodec(kvshared.RawCodec{}))
	}
	for i := 0; i < warmup; i++ {
		if err := call(); err != nil {
			fail("warmup", err)
		}
	}
	lat := make([]time.Duration, calls)
	t0 := time.Now()
	for i := 0; i < calls; i++ {
		t := time.Now()
		if err := call(); err != nil {
			fail("Put", err)
		}
		lat[i] = time.Since(t)
	}
	secs := time.Since(t0).Seconds()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	us := func(q float64) float64 {
		return float64(lat[int(q*float64(len(lat)-1))].Nanoseconds()) / 1e3
	}
	return map[string]interface{}{"calls": calls, "seconds": secs,
		"calls_per_s": float64(calls) / secs, "p50_us": us(0.5), "p99_us": us(0.99)}
}


func main() {
	if len(os.Args) < 2 {
		fail("usage", errors.New("gpmuxbench stdio|unary [FLAGS]"))
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	mux := fs.Bool("mux", false, "multiplexed (PLUGIN_MULTIPLEX_GRPC=true)")
	automtls := fs.Bool("automtls", false, "AutoMTLS")
	command := fs.String("plugin", "", "plugin command (sh -c)")
	nbytes := fs.Int64("bytes", 64<<20, "stdio: bytes to read")
	calls := fs.Int("calls", 5000, "unary: timed calls")
	warmup := fs.Int("warmup", 100, "unary: untimed calls")
	_ = fs.Parse(os.Args[2:])
	if *command == "" {
		fail("usage", errors.New("--plugin CMD is required"))
	}
	p := start(*command, *mux, *automtls)
	var res map[string]interface{}
	switch os.Args[1] {
	case "stdio":
		res = stdio(p, *nbytes)
	case "unary":
		res = unary(p, kvshared.KVPutMethod, kvshared.KVPutRequest{Key: "bench",
			Value: []byte(strings.Repeat("v", 64))}.Marshal(), *calls, *warmup)
	case "health":
		// HealthCheckRequest{service: "plugin"}
		res = unary(p, "/grpc.health.v1.Health/Check",
			append([]byte{0x0a, 6}, "plugin"...), *calls, *warmup)
	default:
		p.kill()
		fail("usage", fmt.Errorf("unknown workload %q", os.Args[1]))
	}
	p.kill()
	res["mux"] = *mux
	res["automtls"] = *automtls
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
}
