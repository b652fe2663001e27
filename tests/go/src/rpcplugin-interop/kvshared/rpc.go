package kvshared

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the "proto" codec
	"google.golang.org/grpc/status"
)

// RawCodec passes *[]byte through unchanged.  Clients use it per call
// (grpc.ForceCodec); its name keeps the content type application/grpc+proto.
type RawCodec struct{}

func (RawCodec) Marshal(v interface{}) ([]byte, error) {
	if b, ok := v.(*[]byte); ok {
		return *b, nil
	}
	return nil, errNotBytes
}

func (RawCodec) Unmarshal(data []byte, v interface{}) error {
	if b, ok := v.(*[]byte); ok {
		*b = append((*b)[:0], data...)
		return nil
	}
	return errNotBytes
}

func (RawCodec) Name() string { return "proto" }

// ServerCodec is for grpc.CustomCodec on a server that also carries
// generated services (go-plugin's health, broker and controller): *[]byte
// passes through, every other value goes to the registered proto codec.
type ServerCodec struct{}

func (ServerCodec) Marshal(v interface{}) ([]byte, error) {
	if b, ok := v.(*[]byte); ok {
		return *b, nil
	}
	return encoding.GetCodec("proto").Marshal(v)
}

func (ServerCodec) Unmarshal(data []byte, v interface{}) error {
	if b, ok := v.(*[]byte); ok {
		*b = append((*b)[:0], data...)
		return nil
	}
	return encoding.GetCodec("proto").Unmarshal(data, v)
}

func (ServerCodec) Name() string   { return "proto" }
func (ServerCodec) String() string { return "proto" }

// NewServer is a ServeConfig.GRPCServer / AcceptAndServe factory:
// grpc.NewServer with go-plugin's options (TLS) plus ServerCodec.
func NewServer(opts []grpc.ServerOption) *grpc.Server {
	return grpc.NewServer(append(opts, grpc.CustomCodec(ServerCodec{}))...)
}

// invoke makes a unary call with raw request and response bytes.
func invoke(ctx context.Context, conn *grpc.ClientConn, method string, req []byte) ([]byte, error) {
	var resp []byte
	err := conn.Invoke(ctx, method, &req, &resp, grpc.ForceCodec(RawCodec{}))
	return resp, err
}

// unaryHandler is the type of grpc.MethodDesc.Handler.
type unaryHandler = func(srv interface{}, ctx context.Context, dec func(interface{}) error,
	ic grpc.UnaryServerInterceptor) (interface{}, error)

// unary makes a method handler that gives fn the raw request bytes and
// sends the raw bytes it returns.  Undecodable requests are answered like
// generated code answers them: INTERNAL "grpc: error unmarshalling request".
func unary(fullMethod string, fn func(srv interface{}, ctx context.Context, req []byte) ([]byte, error)) unaryHandler {
	return func(srv interface{}, ctx context.Context, dec func(interface{}) error,
		ic grpc.UnaryServerInterceptor) (interface{}, error) {
		var in []byte
		if err := dec(&in); err != nil {
			return nil, err
		}
		h := func(ctx context.Context, req interface{}) (interface{}, error) {
			out, err := fn(srv, ctx, *req.(*[]byte))
			if err != nil {
				return nil, err
			}
			return &out, nil
		}
		if ic == nil {
			return h(ctx, &in)
		}
		return ic(ctx, &in, &grpc.UnaryServerInfo{Server: srv, FullMethod: fullMethod}, h)
	}
}

func badRequest(err error) error {
	return status.Errorf(codes.Internal, "grpc: error unmarshalling request: %v", err)
}
