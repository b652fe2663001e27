// gpcounter is a go-plugin v1.0.1 client of the bidirectional Counter
// protocol of go-plugin's examples/bidirectional, behaving like
// examples/bidirectional/main.go: it starts the plugin with "sh -c COMMAND"
// (COMMAND from --plugin or $COUNTER_PLUGIN), dispenses "counter", and for
// put serves proto.AddHelper (Sum) through the broker on a new id
// (broker.NextId, AcceptAndServe) that it passes in PutRequest.add_server;
// the plugin dials it back to add VALUE to the stored value.
//
//	gpcounter [--automtls] [--timeout 10s] [--plugin CMD] put KEY VALUE
//	gpcounter [--automtls] [--timeout 10s] [--plugin CMD] get KEY
//
// put prints nothing; get prints the number and a newline.  Any failure
// prints "FAIL <step>: <error>" on stderr and exits 1.
package main

import (
	"context"
	"fmt"
	"strconv"

	plugin "github.com/hashicorp/go-plugin"

	"rpcplugin-interop/kvshared"
)

const env = "COUNTER_PLUGIN"

// addHelper is the host's implementation of AddHelper.
type addHelper struct{}

func (addHelper) Sum(_ context.Context, a, b int64) (int64, error) { return a + b, nil }

func main() {
	c := kvshared.NewCommand("gpcounter", `usage:
  gpcounter [FLAGS] put KEY VALUE
  gpcounter [FLAGS] get KEY
`, env)
	op, h := c.Op, c.Flags
	args := c.Parse()
	if !(op == "get" && len(args) == 1) && !(op == "put" && len(args) == 2) {
		c.Usage()
	}
	var value int64
	if op == "put" {
		v, err := strconv.ParseInt(args[1], 10, 64)
		if err != nil {
			kvshared.Fail("flags", err)
		}
		value = v
	}

	s, raw := kvshared.Launch(&h, env,
		map[string]plugin.Plugin{kvshared.CounterPluginName: &kvshared.CounterGRPCPlugin{}},
		kvshared.CounterPluginName)
	counter, ok := raw.(*kvshared.CounterClient)
	if !ok {
		kvshared.Fail("dispense", fmt.Errorf("unexpected type %T", raw))
	}
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	defer cancel()
	switch op {
	case "get":
		v, err := counter.Get(ctx, args[0])
		if err != nil {
			kvshared.Fail("get", err)
		}
		fmt.Println(v)
	case "put":
		if err := counter.Put(ctx, args[0], value, addHelper{}); err != nil {
			kvshared.Fail("put", err)
		}
	}
	s.Kill()
}
