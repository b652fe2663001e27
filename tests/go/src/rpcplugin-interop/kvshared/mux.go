package kvshared

import (
	"context"

	"google.golang.org/grpc"
)

// Exports for the multiplexed-broker programs (gpmux, gpmuxplugin), which
// do not use go-plugin v1.0.1's GRPCBroker and so register and call the
// services themselves.

// RegisterAddHelper registers a as proto.AddHelper on s (a server made
// with NewServer).
func RegisterAddHelper(s *grpc.Server, a AddHelper) {
	s.RegisterService(&addHelperServiceDesc, a)
}

// RegisterCounter registers impl as proto.Counter on s (a server made with
// NewServer); Put reaches the client's AddHelper with dial(add_server).
func RegisterCounter(s *grpc.Server, impl Counter, dial func(id uint32) (*grpc.ClientConn, error)) {
	s.RegisterService(&counterServiceDesc, &counterServer{impl: impl, dial: dial})
}

// NewAddHelperClient calls proto.AddHelper over conn.
func NewAddHelperClient(conn *grpc.ClientConn) AddHelper { return &AddHelperClient{conn: conn} }

// Invoke makes a unary call with raw request and response bytes.
func Invoke(ctx context.Context, conn *grpc.ClientConn, method string, req []byte) ([]byte, error) {
	return invoke(ctx, conn, method, req)
}
