// gpcounterplugin is a go-plugin v1.0.1 plugin serving the Counter protocol
// of go-plugin's examples/bidirectional, like
// examples/bidirectional/plugin-go-grpc: values live as JSON {"Value":N}
// in the file kv_<key> in the working directory; Put(add_server, key,
// value) dials the host's AddHelper through the broker (broker.Dial of
// add_server) and stores Sum(stored, value); Get returns the stored value
// (an error if the key was never put).
//
//	COUNTER_PLUGIN="gpcounterplugin [--fix-broker-tls]" gpcounter put hello 1
//
// go-plugin v1.0.1 cannot broker.Dial from the plugin under AutoMTLS: the
// plugin's broker TLS config has no RootCAs and no ServerName, so the host's
// certificate fails verification ("x509: certificate is valid for
// localhost, not unused").  v1.4.4 fixed it (hashicorp/go-plugin#193) by
// giving that config RootCAs = the host's certificate (PLUGIN_CLIENT_CERT)
// and ServerName "localhost".  --fix-broker-tls does the same to v1.0.1's
// broker (through reflect, as the field is unexported); without it the
// plugin behaves as v1.0.1 does.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"reflect"
	"unsafe"

	plugin "github.com/hashicorp/go-plugin"

	"rpcplugin-interop/kvshared"
)

// counter stores each key as JSON in the file kv_<key>.
type counter struct{}

type data struct {
	Value int64
}

func (c counter) Put(ctx context.Context, key string, value int64, a kvshared.AddHelper) error {
	v, _ := c.Get(key) // a key never put counts as 0
	r, err := a.Sum(ctx, v, value)
	if err != nil {
		return err
	}
	buf, err := json.Marshal(&data{r})
	if err != nil {
		return err
	}
	return os.WriteFile("kv_"+key, buf, 0644)
}

func (counter) Get(key string) (int64, error) {
	raw, err := os.ReadFile("kv_" + key)
	if err != nil {
		return 0, err
	}
	var d data
	if err := json.Unmarshal(raw, &d); err != nil {
		return 0, err
	}
	return d.Value, nil
}

// fixBrokerTLS gives the broker's TLS config (shared by its Dial and
// AcceptAndServe; nil without AutoMTLS) what v1.4.4 gives it.
func fixBrokerTLS(b *plugin.GRPCBroker) error {
	f := reflect.ValueOf(b).Elem().FieldByName("tls")
	if !f.IsValid() || f.Type() != reflect.TypeOf((*tls.Config)(nil)) {
		return errors.New("--fix-broker-tls: GRPCBroker has no field tls *tls.Config (not go-plugin v1.0.1?)")
	}
	cfg := *(**tls.Config)(unsafe.Pointer(f.UnsafeAddr()))
	if cfg == nil {
		return nil // no TLS, nothing to fix
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(os.Getenv("PLUGIN_CLIENT_CERT"))) {
		return errors.New("--fix-broker-tls: PLUGIN_CLIENT_CERT holds no certificate")
	}
	cfg.RootCAs = pool
	cfg.ServerName = "localhost"
	return nil
}

func main() {
	fix := flag.Bool("fix-broker-tls", false,
		"under AutoMTLS, let broker.Dial verify the host as go-plugin v1.4.4 does")
	flag.Parse()
	p := &kvshared.CounterGRPCPlugin{Impl: counter{}}
	if *fix {
		p.OnServer = fixBrokerTLS
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: kvshared.Handshake,
		Plugins:         map[string]plugin.Plugin{kvshared.CounterPluginName: p},
		// Non-nil: serve gRPC.  NewServer adds the codec for raw messages.
		GRPCServer: kvshared.NewServer,
	})
}
