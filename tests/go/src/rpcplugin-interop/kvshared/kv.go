package kvshared

import (
	"context"

	plugin "github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// Handshake is the handshake of both examples.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  1,
	MagicCookieKey:   "BASIC_PLUGIN",
	MagicCookieValue: "hello",
}

// Plugin names: the client dispenses "kv_grpc" (examples/grpc/main.go);
// plugin-go-grpc serves the same plugin under "kv" (with gRPC the server's
// name is not used on the wire).
const (
	KVPluginName       = "kv_grpc"
	KVServerPluginName = "kv"
)

// Method paths of service proto.KV.
const (
	KVGetMethod = "/proto.KV/Get"
	KVPutMethod = "/proto.KV/Put"
)

// KV is what a KV plugin implements (examples/grpc/shared.KV).
type KV interface {
	Put(key string, value []byte) error
	Get(key string) ([]byte, error)
}

// KVClient is the host's side of service proto.KV.
type KVClient struct{ conn *grpc.ClientConn }

// Put calls /proto.KV/Put.
func (c *KVClient) Put(ctx context.Context, key string, value []byte) error {
	resp, err := invoke(ctx, c.conn, KVPutMethod, KVPutRequest{Key: key, Value: value}.Marshal())
	if err != nil {
		return err
	}
	return new(Empty).Unmarshal(resp)
}

// Get calls /proto.KV/Get.
func (c *KVClient) Get(ctx context.Context, key string) ([]byte, error) {
	resp, err := invoke(ctx, c.conn, KVGetMethod, GetRequest{Key: key}.Marshal())
	if err != nil {
		return nil, err
	}
	var m KVGetResponse
	if err := m.Unmarshal(resp); err != nil {
		return nil, err
	}
	return m.Value, nil
}

var kvServiceDesc = grpc.ServiceDesc{
	ServiceName: "proto.KV",
	HandlerType: (*KV)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Get", Handler: unary(KVGetMethod, func(srv interface{}, _ context.Context, req []byte) ([]byte, error) {
			var in GetRequest
			if err := in.Unmarshal(req); err != nil {
				return nil, badRequest(err)
			}
			v, err := srv.(KV).Get(in.Key)
			if err != nil {
				return nil, err
			}
			return KVGetResponse{Value: v}.Marshal(), nil
		})},
		{MethodName: "Put", Handler: unary(KVPutMethod, func(srv interface{}, _ context.Context, req []byte) ([]byte, error) {
			var in KVPutRequest
			if err := in.Unmarshal(req); err != nil {
				return nil, badRequest(err)
			}
			if err := srv.(KV).Put(in.Key, in.Value); err != nil {
				return nil, err
			}
			return Empty{}.Marshal(), nil
		})},
	},
	Metadata: "proto/kv.proto",
}

// KVGRPCPlugin is the go-plugin plugin for KV (gRPC only).  The server
// side needs a grpc.Server built with ServerCodec (use NewServer).
type KVGRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Impl KV // server side only
}

func (p *KVGRPCPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	s.RegisterService(&kvServiceDesc, p.Impl)
	return nil
}

func (p *KVGRPCPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (interface{}, error) {
	return &KVClient{conn: c}, nil
}

var _ plugin.GRPCPlugin = &KVGRPCPlugin{}
