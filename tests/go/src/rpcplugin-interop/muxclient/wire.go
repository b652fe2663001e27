// Package muxclient is the client (host) side of go-plugin's gRPC broker
// multiplexing (go-plugin >= v1.6, GRPCBrokerMultiplex), written after
// go-plugin v1.8.0's internal/grpcmux/grpc_client_muxer.go, grpc_broker.go
// and client.go, for Debian's go-plugin v1.0.1 GOPATH tree, which has no
// muxer and whose ConnInfo has no knock.  gpmux uses it; gpmuxplugin (a
// fake plugin for gpmux's self-test) uses its wire helpers and certificate
// generator.
//
//	wire.go    ConnInfo{service_id, network, address, knock}, StdioData, by hand (protowire)
//	launch.go  starting the plugin (environment, AutoMTLS) and the 7-field handshake line
//	muxer.go   one net.Conn, one yamux client session; knock-blocked listeners
//	broker.go  plugin.GRPCBroker/StartStream on the main connection: knocks and acks
package muxclient

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// Knock is plugin.ConnInfo.Knock {bool knock = 1; bool ack = 2; string error = 3;}.
type Knock struct {
	Knock bool
	Ack   bool
	Error string
}

// ConnInfo is plugin.ConnInfo {uint32 service_id = 1; string network = 2;
// string address = 3; Knock knock = 4;}.  Knock is nil when absent.
type ConnInfo struct {
	ServiceID uint32
	Network   string
	Address   string
	Knock     *Knock
}

func (c ConnInfo) String() string {
	if c.Knock == nil {
		return fmt.Sprintf("{id=%d network=%q address=%q}", c.ServiceID, c.Network, c.Address)
	}
	return fmt.Sprintf("{id=%d knock=%v ack=%v error=%q}", c.ServiceID, c.Knock.Knock, c.Knock.Ack, c.Knock.Error)
}

func appendBool(b []byte, num protowire.Number, v bool) []byte {
	if !v {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, 1)
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// Marshal encodes c (proto3: zero scalars left out; a present Knock is
// always written, even when empty).
func (c ConnInfo) Marshal() []byte {
	var b []byte
	if c.ServiceID != 0 {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(c.ServiceID))
	}
	b = appendString(b, 2, c.Network)
	b = appendString(b, 3, c.Address)
	if c.Knock != nil {
		k := appendBool(nil, 1, c.Knock.Knock)
		k = appendBool(k, 2, c.Knock.Ack)
		k = appendString(k, 3, c.Knock.Error)
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendBytes(b, k)
	}
	if b == nil {
		b = []byte{}
	}
	return b
}

// walk calls f(num, typ, varint, bytes) for each field; unknown wire types
// are skipped.
func walk(b []byte, f func(protowire.Number, protowire.Type, uint64, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		var v uint64
		var bs []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			bs, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		if err := f(num, typ, v, bs); err != nil {
			return err
		}
	}
	return nil
}

// UnmarshalConnInfo decodes a ConnInfo (last occurrence wins; a repeated
// knock field merges, as proto3 does for messages).
func UnmarshalConnInfo(b []byte) (ConnInfo, error) {
	var c ConnInfo
	err := walk(b, func(num protowire.Number, typ protowire.Type, v uint64, bs []byte) error {
		switch {
		case num == 1 && typ == protowire.VarintType:
			c.ServiceID = uint32(v)
		case num == 2 && typ == protowire.BytesType:
			c.Network = string(bs)
		case num == 3 && typ == protowire.BytesType:
			c.Address = string(bs)
		case num == 4 && typ == protowire.BytesType:
			if c.Knock == nil {
				c.Knock = &Knock{}
			}
			k := c.Knock
			return walk(bs, func(num protowire.Number, typ protowire.Type, v uint64, bs []byte) error {
				switch {
				case num == 1 && typ == protowire.VarintType:
					k.Knock = v != 0
				case num == 2 && typ == protowire.VarintType:
					k.Ack = v != 0
				case num == 3 && typ == protowire.BytesType:
					k.Error = string(bs)
				}
				return nil
			})
		}
		return nil
	})
	return c, err
}

// StdioData channels (plugin.StdioData.Channel).
const (
	StdioStdout = 1
	StdioStderr = 2
)

// MarshalStdioData encodes plugin.StdioData {Channel channel = 1; bytes data = 2;}.
func MarshalStdioData(channel int, data []byte) []byte {
	var b []byte
	if channel != 0 {
		b = protowire.AppendTag(b, 1, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(channel))
	}
	if len(data) > 0 {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, data)
	}
	if b == nil {
		b = []byte{}
	}
	return b
}
