// Package common holds what gpclient and gpserver share: the handshake
// settings, the trivial "interop" plugin, a line printer for stdout, bounded
// waits, a Health/Check helper and a pass-through codec for hand-written
// protobuf (v1.0.1 has no GRPCStdio client, and Debian ships no
// protoc-gen-go binary, so StdioData is decoded with protowire).
package common

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/encoding/protowire"
)

// Defaults shared by both programs (and by tests that drive rpcplugin-host
// with --magic-cookie DefaultCookieKey=DefaultCookieValue).
const (
	DefaultCookieKey   = "RPCPLUGIN_INTEROP_COOKIE"
	DefaultCookieValue = "rpcplugin-interop"
	DefaultAppVersion  = 1
	PluginName         = "interop"
)

// ParseCookie splits KEY=VALUE.
func ParseCookie(s string) (string, string, error) {
	i := strings.IndexByte(s, '=')
	if i <= 0 || i == len(s)-1 {
		return "", "", fmt.Errorf("magic cookie %q: expected KEY=VALUE", s)
	}
	return s[:i], s[i+1:], nil
}

// ---------------------------------------------------------------- output

var outMu sync.Mutex

// Say prints one result line on stdout (one write, serialised).
func Say(format string, args ...interface{}) {
	line := fmt.Sprintf(format, args...) + "\n"
	outMu.Lock()
	os.Stdout.WriteString(line)
	outMu.Unlock()
}

// Cleanup, when set, runs in Fail before the exit (gpclient launch uses it
// so that a failed step never leaves the plugin process behind).
var Cleanup func()

// Fail prints "FAIL <what>: <err>" on stdout and exits 1.
func Fail(what string, err error) {
	Say("FAIL %s: %v", what, err)
	if Cleanup != nil {
		Cleanup()
	}
	os.Exit(1)
}

// PrefixWriter turns written bytes into Say lines with a prefix, and
// passes each line to OnLine when set.
type PrefixWriter struct {
	Prefix string
	OnLine func(string)
	mu     sync.Mutex
	buf    []byte
}

func (w *PrefixWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := indexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		line := string(w.buf[:i])
		Say("%s%s", w.Prefix, line)
		if w.OnLine != nil {
			w.OnLine(line)
		}
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// Logger builds an hclog logger on stderr at the given level name.
func Logger(name, level string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:   name,
		Level:  hclog.LevelFromString(level),
		Output: os.Stderr,
	})
}

// ---------------------------------------------------------------- waits

// ErrTimeout is returned by Within when the deadline passes first.
var ErrTimeout = errors.New("timed out")

// Within runs f in a goroutine and waits at most d for it.  go-plugin v1.0.1
// makes several calls with context.Background() (Ping, the Shutdown inside
// Kill), so every call into it is bounded from the outside.
func Within(d time.Duration, f func() error) error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		return fmt.Errorf("%w after %v", ErrTimeout, d)
	}
}

// Ms formats a duration as milliseconds with three decimals.
func Ms(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 3, 64)
}

// ---------------------------------------------------------------- plugin

// Handle is what the client side of the interop plugin dispenses: the raw
// broker and connection, nothing else.
type Handle struct {
	Broker *plugin.GRPCBroker
	Conn   *grpc.ClientConn
}

// InteropPlugin is a GRPCPlugin with no service of its own.  OnServer, when
// set, receives the server-side broker (gpserver uses it for brokering).
type InteropPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	OnServer func(*plugin.GRPCBroker, *grpc.Server)
}

func (p *InteropPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	if p.OnServer != nil {
		p.OnServer(b, s)
	}
	return nil
}

func (p *InteropPlugin) GRPCClient(ctx context.Context, b *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &Handle{Broker: b, Conn: c}, nil
}

// ---------------------------------------------------------------- health

// HealthCheck calls /grpc.health.v1.Health/Check for service on conn.
func HealthCheck(conn *grpc.ClientConn, service string, d time.Duration) (grpc_health_v1.HealthCheckResponse_ServingStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	r, err := grpc_health_v1.NewHealthClient(conn).Check(ctx,
		&grpc_health_v1.HealthCheckRequest{Service: service})
	if err != nil {
		return grpc_health_v1.HealthCheckResponse_UNKNOWN, err
	}
	return r.Status, nil
}

// CallCounter is a unary server interceptor that reports each completed
// call's method name on a channel (non-blocking, buffered).
type CallCounter struct {
	Calls chan string
}

func NewCallCounter() *CallCounter {
	return &CallCounter{Calls: make(chan string, 64)}
}

func (c *CallCounter) Unary(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (interface{}, error) {
	resp, err := h(ctx, req)
	select {
	case c.Calls <- info.FullMethod:
	default:
	}
	return resp, err
}

// ---------------------------------------------------------------- raw codec

// RawCodec passes *[]byte through unchanged (for hand-written messages).
type RawCodec struct{}

func (RawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("RawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (RawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("RawCodec: cannot unmarshal into %T", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

func (RawCodec) Name() string { return "proto" }

// StdioData is plugin.StdioData: channel = 1 (enum), data = 2 (bytes).
type StdioData struct {
	Channel int
	Data    []byte
}

// ChannelName names a StdioData channel.
func ChannelName(c int) string {
	switch c {
	case 1:
		return "STDOUT"
	case 2:
		return "STDERR"
	case 0:
		return "INVALID"
	}
	return "CHANNEL" + strconv.Itoa(c)
}

// DecodeStdioData decodes the wire form; unknown fields are skipped.
func DecodeStdioData(b []byte) (StdioData, error) {
	var m StdioData
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return m, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return m, protowire.ParseError(n)
			}
			m.Channel = int(int32(v))
			b = b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return m, protowire.ParseError(n)
			}
			m.Data = append([]byte(nil), v...) // proto3: the last one wins
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return m, protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	return m, nil
}
