// gpkv is a go-plugin v1.0.1 client of the KV protocol of go-plugin's
// examples/grpc, behaving like examples/grpc/main.go: it starts the plugin
// with "sh -c COMMAND" (COMMAND from --plugin or $KV_PLUGIN), connects over
// gRPC, dispenses "kv_grpc" and calls /proto.KV/Put or /proto.KV/Get, then
// Kill()s the plugin.
//
//	gpkv [--automtls] [--timeout 10s] [--plugin CMD] get KEY
//	gpkv [--automtls] [--timeout 10s] [--plugin CMD] put KEY VALUE
//	gpkv [--automtls] [--plugin CMD] bench [--n 10000] [--concurrency 4] [--size 64] [--stop-file F]
//
// get prints the value's bytes and a newline.  bench makes N Put calls of
// SIZE-byte values from C goroutines on one dispensed client and prints one
// JSON line with p50/p99 latency (µs) and calls/s; with --stop-file it
// stops early once file F exists (N is then a maximum, and "n" in the line
// the calls made).  Any failure prints
// "FAIL <step>: <error>" on stderr and exits 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	plugin "github.com/hashicorp/go-plugin"

	"rpcplugin-interop/kvshared"
)

const env = "KV_PLUGIN"

func main() {
	c := kvshared.NewCommand("gpkv", `usage:
  gpkv [FLAGS] get KEY
  gpkv [FLAGS] put KEY VALUE
  gpkv [FLAGS] bench [--n N] [--concurrency C] [--size BYTES] [--warmup N] [--key PREFIX] [--stop-file F]
`, env)
	switch c.Op {
	case "get", "put":
		args := c.Parse()
		want := map[string]int{"get": 1, "put": 2}[c.Op]
		if len(args) != want {
			c.Usage()
		}
		getPut(&c.Flags, c.Op, args)
	case "bench":
		var b benchOpts
		c.Sub.IntVar(&b.n, "n", 10000, "number of timed Put calls")
		c.Sub.IntVar(&b.concurrency, "concurrency", 4, "goroutines making calls on the one client")
		c.Sub.IntVar(&b.size, "size", 64, "value size in bytes")
		c.Sub.IntVar(&b.warmup, "warmup", 100, "untimed Put calls before the timed ones")
		c.Sub.StringVar(&b.key, "key", "bench", "key prefix; goroutine i uses PREFIX<i>")
		c.Sub.StringVar(&b.stopFile, "stop-file", "", "stop the timed calls once this file exists")
		if len(c.Parse()) != 0 || b.n < 1 || b.concurrency < 1 || b.size < 0 || b.warmup < 0 {
			c.Usage()
		}
		bench(&c.Flags, &b)
	default:
		c.Usage()
	}
}

func dispense(h *kvshared.HostFlags) (*kvshared.Session, *kvshared.KVClient) {
	s, raw := kvshared.Launch(h, env,
		map[string]plugin.Plugin{kvshared.KVPluginName: &kvshared.KVGRPCPlugin{}},
		kvshared.KVPluginName)
	kv, ok := raw.(*kvshared.KVClient)
	if !ok {
		kvshared.Fail("dispense", fmt.Errorf("unexpected type %T", raw))
	}
	return s, kv
}

func getPut(h *kvshared.HostFlags, op string, args []string) {
	s, kv := dispense(h)
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	defer cancel()
	switch op {
	case "get":
		v, err := kv.Get(ctx, args[0])
		if err != nil {
			kvshared.Fail("get", err)
		}
		os.Stdout.Write(append(v, '\n'))
	case "put":
		if err := kv.Put(ctx, args[0], []byte(args[1])); err != nil {
			kvshared.Fail("put", err)
		}
	}
	s.Kill()
}

type benchOpts struct {
	n, concurrency, size, warmup int
	key, stopFile                string
}

// benchResult is the JSON line bench prints.
type benchResult struct {
	Program     string  `json:"program"`
	Op          string  `json:"op"`
	N           int     `json:"n"`
	Concurrency int     `json:"concurrency"`
	Size        int     `json:"size"`
	AutoMTLS    bool    `json:"automtls"`
	ElapsedS    float64 `json:"elapsed_s"`
	CallsPerS   float64 `json:"calls_per_s"`
	P50us       float64 `json:"p50_us"`
	P99us       float64 `json:"p99_us"`
	MinUs       float64 `json:"min_us"`
	MaxUs       float64 `json:"max_us"`
	MeanUs      float64 `json:"mean_us"`
}

func bench(h *kvshared.HostFlags, b *benchOpts) {
	s, kv := dispense(h)
	value := make([]byte, b.size)
	for i := range value {
		value[i] = 'a' + byte(i%26)
	}
	put := func(key string) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
		defer cancel()
		t0 := time.Now()
		err := kv.Put(ctx, key, value)
		return time.Since(t0), err
	}
	for i := 0; i < b.warmup; i++ {
		if _, err := put(fmt.Sprintf("%s%d", b.key, i%b.concurrency)); err != nil {
			kvshared.Fail("bench warmup", err)
		}
	}

	lat := make([]time.Duration, b.n)
	var next int64 = -1
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	t0 := time.Now()
	for w := 0; w < b.concurrency; w++ {
		key := fmt.Sprintf("%s%d", b.key, w)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := atomic.AddInt64(&next, 1)
				if i >= int64(b.n) {
					return
				}
				if b.stopFile != "" {
					if _, err := os.Stat(b.stopFile); err == nil {
						atomic.StoreInt64(&next, int64(b.n))
						return
					}
				}
				d, err := put(key)
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("call %d: %w", i, err) })
					atomic.StoreInt64(&next, int64(b.n)) // stop everyone
					return
				}
				lat[i] = d
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	if firstErr != nil {
		kvshared.Fail("bench", firstErr)
	}

	// The value must have arrived: what Get returns starts with it (the
	// Go plugin, like the example, appends a "Written from" trailer).
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	got, err := kv.Get(ctx, b.key+"0")
	cancel()
	if err != nil {
		kvshared.Fail("bench verify", err)
	}
	if len(got) < len(value) || string(got[:len(value)]) != string(value) {
		kvshared.Fail("bench verify", errors.New("Get after the Puts does not return the value"))
	}

	// Calls not made (stopped early) left a zero.
	made := lat[:0]
	for _, d := range lat {
		if d > 0 {
			made = append(made, d)
		}
	}
	lat = made
	if len(lat) == 0 {
		kvshared.Fail("bench", errors.New("no call was made"))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	us := func(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Microsecond)*10) / 10 }
	line, _ := json.Marshal(benchResult{
		Program: "gpkv", Op: "put", N: len(lat), Concurrency: b.concurrency, Size: b.size,
		AutoMTLS:  h.AutoMTLS,
		ElapsedS:  math.Round(elapsed.Seconds()*1e6) / 1e6,
		CallsPerS: math.Round(float64(len(lat))/elapsed.Seconds()*10) / 10,
		P50us:     us(percentile(lat, 0.50)),
		P99us:     us(percentile(lat, 0.99)),
		MinUs:     us(lat[0]),
		MaxUs:     us(lat[len(lat)-1]),
		MeanUs:    us(sum / time.Duration(len(lat))),
	})
	s.Kill()
	fmt.Println(string(line))
}

// percentile is the nearest-rank percentile of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	return sorted[i]
}
