// gpkvplugin is a go-plugin v1.0.1 plugin serving the KV protocol of
// go-plugin's examples/grpc over gRPC, like examples/grpc/plugin-go-grpc:
// Put(key, value) writes value + SUFFIX to the file kv_<key> in the working
// directory, Get(key) returns that file's contents.  It is the reference
// implementation gpkv is validated against, and the Go anchor of the KV
// benchmark.
//
//	KV_PLUGIN="gpkvplugin [--suffix S] [--memory]" gpkv put hello world
//
// --suffix defaults to the example's "\n\nWritten from plugin-go-grpc";
// an empty --suffix stores values unchanged.  --memory keeps the values in
// a map instead of files (for benchmarks of the RPC path alone; they are
// lost when the plugin exits).  It must be started by a go-plugin host (the
// magic cookie BASIC_PLUGIN=hello is in its environment).
package main

import (
	"flag"
	"os"
	"sync"
	"syscall"

	plugin "github.com/hashicorp/go-plugin"

	"rpcplugin-interop/kvshared"
)

// kv stores each key in the file kv_<key>.
type kv struct{ suffix string }

func (k kv) Put(key string, value []byte) error {
	return os.WriteFile("kv_"+key, append(value, k.suffix...), 0644)
}

func (kv) Get(key string) ([]byte, error) {
	return os.ReadFile("kv_" + key)
}

// memKV stores values in memory; a missing key fails like a missing file.
type memKV struct {
	suffix string
	mu     sync.Mutex
	m      map[string][]byte
}

func (k *memKV) Put(key string, value []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.m[key] = append(append([]byte{}, value...), k.suffix...)
	return nil
}

func (k *memKV) Get(key string) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	v, ok := k.m[key]
	if !ok {
		return nil, &os.PathError{Op: "open", Path: "kv_" + key, Err: syscall.ENOENT}
	}
	return v, nil
}

func main() {
	suffix := flag.String("suffix", "\n\nWritten from plugin-go-grpc",
		"appended to every stored value")
	memory := flag.Bool("memory", false, "keep values in memory, not in files")
	flag.Parse()
	var impl kvshared.KV = kv{suffix: *suffix}
	if *memory {
		impl = &memKV{suffix: *suffix, m: map[string][]byte{}}
	}
	plugin.Serve(&plugin.ServeConfig{
		HandshakeConfig: kvshared.Handshake,
		Plugins: map[string]plugin.Plugin{
			kvshared.KVServerPluginName: &kvshared.KVGRPCPlugin{Impl: impl},
		},
		// Non-nil: serve gRPC.  NewServer adds the codec for raw messages.
		GRPCServer: kvshared.NewServer,
	})
}
