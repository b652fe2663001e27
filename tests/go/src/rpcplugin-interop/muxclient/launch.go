package muxclient

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrMuxNotSupported is go-plugin's ErrGRPCBrokerMuxNotSupported.
var ErrMuxNotSupported = errors.New("client requested gRPC broker multiplexing but plugin does not support the feature")

// Options say how to start the plugin.
type Options struct {
	Command     string // run with sh -c, as go-plugin's examples do
	CookieKey   string // the handshake config's magic cookie
	CookieValue string
	Versions    string // PLUGIN_PROTOCOL_VERSIONS, e.g. "1"
	AutoMTLS    bool
	Timeout     time.Duration // for the handshake line
	Stderr      io.Writer     // the plugin's stderr and stdout after the handshake, prefixed
}

// Handshake is the plugin's first stdout line,
// CORE|APP|NETWORK|ADDRESS|PROTOCOL|SERVERCERT|MUX.
type Handshake struct {
	Line       string
	Fields     int
	Core, App  int
	Network    string
	Address    string
	Protocol   string
	ServerCert string // base64 (RawStd) DER, "" without AutoMTLS
	Mux        bool
}

// ParseHandshake checks the line as go-plugin v1.8.0's client does with
// GRPCBrokerMultiplex set: strings.Split on "|", at least 4 fields, core
// version 1, protocol grpc, and a 7th field that parses as true.
func ParseHandshake(line string) (Handshake, error) {
	line = strings.TrimSpace(line)
	parts := strings.Split(line, "|")
	h := Handshake{Line: line, Fields: len(parts)}
	if len(parts) < 4 {
		return h, fmt.Errorf("Unrecognized remote plugin message: %s", line)
	}
	var err error
	if h.Core, err = strconv.Atoi(parts[0]); err != nil {
		return h, fmt.Errorf("error parsing core protocol version: %s", err)
	}
	if h.Core != 1 {
		return h, fmt.Errorf("incompatible core API version with plugin: %s", parts[0])
	}
	if h.App, err = strconv.Atoi(parts[1]); err != nil {
		return h, fmt.Errorf("error parsing app protocol version: %s", err)
	}
	h.Network, h.Address = parts[2], parts[3]
	if h.Network != "unix" && h.Network != "tcp" {
		return h, fmt.Errorf("unknown address type: %s", h.Address)
	}
	h.Protocol = "netrpc"
	if len(parts) >= 5 {
		h.Protocol = parts[4]
	}
	if h.Protocol != "grpc" {
		return h, fmt.Errorf("unsupported plugin protocol %q. Supported: [grpc]", h.Protocol)
	}
	if len(parts) >= 6 && len(parts[5]) > 50 { // go-plugin: > 50 rules out old "extra" data
		h.ServerCert = parts[5]
	}
	if len(parts) <= 6 {
		return h, fmt.Errorf("%w; for Go plugins, you will need to update the "+
			"github.com/hashicorp/go-plugin dependency and recompile", ErrMuxNotSupported)
	}
	mux, err := strconv.ParseBool(parts[6])
	if err != nil {
		return h, fmt.Errorf("error parsing %q as a boolean for gRPC broker multiplexing support", parts[6])
	}
	if !mux {
		return h, ErrMuxNotSupported
	}
	h.Mux = true
	return h, nil
}

// GenerateCert makes what go-plugin's mtls.go generateCert makes: a
// self-signed ECDSA P-521 certificate for "localhost" (IsCA, client and
// server auth), PEM certificate and key.
func GenerateCert() (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "localhost", Organization: []string{"HashiCorp"}},
		DNSNames:              []string{"localhost"},
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		SerialNumber:          sn,
		NotBefore:             time.Now().Add(-30 * time.Second),
		NotAfter:              time.Now().Add(262980 * time.Hour),
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
	return certPEM, keyPEM, nil
}

// Plugin is a started plugin process.
type Plugin struct {
	Handshake Handshake
	TLS       *tls.Config // nil without AutoMTLS
	cmd       *exec.Cmd
	exited    chan struct{}
	exitCode  int
	status    string
	once      sync.Once
}

// Start launches the plugin as go-plugin v1.8.0's Client.Start does with
// GRPCBrokerMultiplex (and AutoMTLS if asked) and reads the handshake line.
// On a handshake error the plugin is still returned (to be killed).
func Start(o Options) (*Plugin, error) {
	cmd := exec.Command("sh", "-c", o.Command)
	cmd.Env = append(os.Environ(),
		o.CookieKey+"="+o.CookieValue,
		"PLUGIN_MIN_PORT=10000", // go-plugin's defaults
		"PLUGIN_MAX_PORT=25000",
		"PLUGIN_PROTOCOL_VERSIONS="+o.Versions,
		"PLUGIN_MULTIPLEX_GRPC=true",
	)
	cmd.Stdin = os.Stdin
	// Own process group, so that the final kill reaches what sh started.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}

	var tlsCfg *tls.Config
	if o.AutoMTLS {
		certPEM, keyPEM, err := GenerateCert()
		if err != nil {
			return nil, err
		}
		cert, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return nil, err
		}
		cmd.Env = append(cmd.Env, "PLUGIN_CLIENT_CERT="+string(certPEM))
		tlsCfg = &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			MinVersion:   tls.VersionTLS12,
			ServerName:   "localhost",
		}
	}

	// Our own pipes, so that Wait only waits for the process, not for
	// whoever else holds the pipes.
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	outW.Close()
	errW.Close()
	p := &Plugin{cmd: cmd, exited: make(chan struct{}), exitCode: -1}
	go func() {
		cmd.Wait()
		p.exitCode = cmd.ProcessState.ExitCode()
		p.status = "exit=" + strconv.Itoa(p.exitCode)
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			p.status = "signal=" + ws.Signal().String()
		}
		close(p.exited)
	}()
	go relay(errR, "PLUGIN_STDERR ", o.Stderr)

	// The first stdout line is the handshake; go-plugin then drains stdout
	// forever.
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(outR)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		relay(outR, "PLUGIN_STDOUT ", o.Stderr)
	}()
	select {
	case <-time.After(o.Timeout):
		return p, errors.New("timeout while waiting for plugin to start")
	case <-p.exited:
		return p, errors.New("plugin exited before we could connect")
	case line, ok := <-lines:
		if !ok {
			return p, errors.New("Unrecognized remote plugin message: \nFailed to read any lines from plugin's stdout")
		}
		p.Handshake, err = ParseHandshake(line)
		if err != nil {
			return p, err
		}
	}
	if tlsCfg != nil {
		// loadServerCert: the plugin's certificate is the only root (and
		// client CA for the servers this client serves through the broker).
		if p.Handshake.ServerCert == "" {
			return p, errors.New("AutoMTLS: the handshake line has no server certificate")
		}
		der, err := base64.RawStdEncoding.DecodeString(p.Handshake.ServerCert)
		if err != nil {
			return p, fmt.Errorf("error parsing server cert: %s", err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return p, fmt.Errorf("error parsing server cert: %s", err)
		}
		pool := x509.NewCertPool()
		pool.AddCert(c)
		tlsCfg.RootCAs, tlsCfg.ClientCAs = pool, pool
		p.TLS = tlsCfg
	}
	return p, nil
}

// relay copies r to w line by line with a prefix (discarding if w is nil).
func relay(r io.Reader, prefix string, w io.Writer) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	var buf bytes.Buffer
	for sc.Scan() {
		if w != nil {
			buf.Reset()
			buf.WriteString(prefix)
			buf.Write(sc.Bytes())
			buf.WriteByte('\n')
			w.Write(buf.Bytes())
		}
	}
}

// Exited is closed when the process has exited (and been reaped).
func (p *Plugin) Exited() <-chan struct{} { return p.exited }

// ExitCode is the exit status (-1 for a signal or while running).
func (p *Plugin) ExitCode() int { return p.exitCode }

// Status is "exit=N" or "signal=NAME" once exited.
func (p *Plugin) Status() string { return p.status }

// Pid is the process id of sh (or what it exec'd).
func (p *Plugin) Pid() int { return p.cmd.Process.Pid }

// Kill sends SIGKILL to the plugin's process group if it is still running.
func (p *Plugin) Kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	p.once.Do(func() {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	})
}
