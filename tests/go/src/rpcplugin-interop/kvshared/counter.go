package kvshared

import (
	"context"
	"sync"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// CounterPluginName is the plugin name of examples/bidirectional (client
// and server).
const CounterPluginName = "counter"

// Method paths of services proto.Counter and proto.AddHelper.
const (
	CounterGetMethod = "/proto.Counter/Get"
	CounterPutMethod = "/proto.Counter/Put"
	AddHelperSum     = "/proto.AddHelper/Sum"
)

// AddHelper is served by the host through the broker for each Put; the
// plugin calls it to add the new value to the stored one.
type AddHelper interface {
	Sum(ctx context.Context, a, b int64) (int64, error)
}

// Counter is what a Counter plugin implements.
type Counter interface {
	Put(ctx context.Context, key string, value int64, a AddHelper) error
	Get(key string) (int64, error)
}

// CounterClient is the host's side of service proto.Counter.
type CounterClient struct {
	broker *plugin.GRPCBroker
	conn   *grpc.ClientConn
}

// Put serves a (as proto.AddHelper) on a new broker id, calls
// /proto.Counter/Put with that id in add_server, then stops the server:
// what examples/bidirectional/shared/grpc.go does.
func (c *CounterClient) Put(ctx context.Context, key string, value int64, a AddHelper) error {
	var mu sync.Mutex
	var srv *grpc.Server
	finished := false
	id := c.broker.NextId()
	go c.broker.AcceptAndServe(id, func(opts []grpc.ServerOption) *grpc.Server {
		s := NewServer(opts)
		s.RegisterService(&addHelperServiceDesc, a)
		mu.Lock()
		srv = s
		if finished { // Put already returned: Serve will return at once
			s.Stop()
		}
		mu.Unlock()
		return s
	})
	resp, err := invoke(ctx, c.conn, CounterPutMethod,
		CounterPutRequest{AddServer: id, Key: key, Value: value}.Marshal())
	mu.Lock()
	finished = true
	if srv != nil {
		srv.Stop()
	}
	mu.Unlock()
	if err != nil {
		return err
	}
	return new(Empty).Unmarshal(resp)
}

// Get calls /proto.Counter/Get.
func (c *CounterClient) Get(ctx context.Context, key string) (int64, error) {
	resp, err := invoke(ctx, c.conn, CounterGetMethod, GetRequest{Key: key}.Marshal())
	if err != nil {
		return 0, err
	}
	var m CounterGetResponse
	if err := m.Unmarshal(resp); err != nil {
		return 0, err
	}
	return m.Value, nil
}

// AddHelperClient is the plugin's side of proto.AddHelper, over a
// connection from broker.Dial.
type AddHelperClient struct{ conn *grpc.ClientConn }

func (c *AddHelperClient) Sum(ctx context.Context, a, b int64) (int64, error) {
	resp, err := invoke(ctx, c.conn, AddHelperSum, SumRequest{A: a, B: b}.Marshal())
	if err != nil {
		return 0, err
	}
	var m SumResponse
	if err := m.Unmarshal(resp); err != nil {
		return 0, err
	}
	return m.R, nil
}

var addHelperServiceDesc = grpc.ServiceDesc{
	ServiceName: "proto.AddHelper",
	HandlerType: (*AddHelper)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Sum", Handler: unary(AddHelperSum, func(srv interface{}, ctx context.Context, req []byte) ([]byte, error) {
			var in SumRequest
			if err := in.Unmarshal(req); err != nil {
				return nil, badRequest(err)
			}
			r, err := srv.(AddHelper).Sum(ctx, in.A, in.B)
			if err != nil {
				return nil, err
			}
			return SumResponse{R: r}.Marshal(), nil
		})},
	},
	Metadata: "proto/kv.proto",
}

// counterServer is the plugin's side of proto.Counter.  dial reaches the
// host's AddHelper by broker id (go-plugin v1.0.1's GRPCBroker.Dial, or
// the multiplexed broker of gpmuxplugin).
type counterServer struct {
	impl Counter
	dial func(id uint32) (*grpc.ClientConn, error)
}

var counterServiceDesc = grpc.ServiceDesc{
	ServiceName: "proto.Counter",
	HandlerType: (*interface{})(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Get", Handler: unary(CounterGetMethod, func(srv interface{}, _ context.Context, req []byte) ([]byte, error) {
			var in GetRequest
			if err := in.Unmarshal(req); err != nil {
				return nil, badRequest(err)
			}
			v, err := srv.(*counterServer).impl.Get(in.Key)
			if err != nil {
				return nil, err
			}
			return CounterGetResponse{Value: v}.Marshal(), nil
		})},
		{MethodName: "Put", Handler: unary(CounterPutMethod, func(srv interface{}, ctx context.Context, req []byte) ([]byte, error) {
			var in CounterPutRequest
			if err := in.Unmarshal(req); err != nil {
				return nil, badRequest(err)
			}
			s := srv.(*counterServer)
			// go-plugin waits up to 5 s (fixed) for the host's ConnInfo.
			conn, err := s.dial(in.AddServer)
			if err != nil {
				return nil, err
			}
			defer conn.Close()
			if err := s.impl.Put(ctx, in.Key, in.Value, &AddHelperClient{conn: conn}); err != nil {
				return nil, err
			}
			return Empty{}.Marshal(), nil
		})},
	},
	Metadata: "proto/kv.proto",
}

// CounterGRPCPlugin is the go-plugin plugin for Counter (gRPC only).  The
// server side needs a grpc.Server built with ServerCodec (use NewServer).
type CounterGRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Impl Counter // server side only
	// OnServer, when set, sees the plugin's broker before the service is
	// registered; an error aborts plugin.Serve.
	OnServer func(*plugin.GRPCBroker) error
}

func (p *CounterGRPCPlugin) GRPCServer(b *plugin.GRPCBroker, s *grpc.Server) error {
	if p.OnServer != nil {
		if err := p.OnServer(b); err != nil {
			return err
		}
	}
	s.RegisterService(&counterServiceDesc, &counterServer{impl: p.Impl, dial: b.Dial})
	return nil
}

func (p *CounterGRPCPlugin) GRPCClient(_ context.Context, b *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &CounterClient{broker: b, conn: c}, nil
}

var _ plugin.GRPCPlugin = &CounterGRPCPlugin{}
