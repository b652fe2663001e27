// Package kvshared is what gpkv, gpkvplugin, gpcounter and gpcounterplugin
// share, in the role of the "shared" packages of go-plugin's
// examples/grpc and examples/bidirectional: the handshake, the plugin
// types, and the two protocols' messages and services.
//
// Debian ships no protoc-gen-go, so the messages of the examples' kv.proto
// files are encoded and decoded by hand with protowire (wire.go), and the
// gRPC services are hand-written grpc.ServiceDesc values whose handlers see
// raw bytes (kv.go, counter.go).  Method paths, message and field numbers
// are exactly those of the examples:
//
//	examples/grpc/proto/kv.proto            package proto; service KV
//	examples/bidirectional/proto/kv.proto   package proto; services Counter, AddHelper
package kvshared

import (
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// field is one decoded field: v for varints, b for length-delimited ones.
type field struct {
	num protowire.Number
	typ protowire.Type
	v   uint64
	b   []byte
}

// walk calls f for each field of a message.  Fields of other wire types
// (fixed32/64, groups) are skipped, as unknown fields are.
func walk(msg []byte, f func(field) error) error {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return protowire.ParseError(n)
		}
		msg = msg[n:]
		fl := field{num: num, typ: typ}
		switch typ {
		case protowire.VarintType:
			fl.v, n = protowire.ConsumeVarint(msg)
		case protowire.BytesType:
			fl.b, n = protowire.ConsumeBytes(msg)
		default:
			n = protowire.ConsumeFieldValue(num, typ, msg)
		}
		if n < 0 {
			return protowire.ParseError(n)
		}
		msg = msg[n:]
		if err := f(fl); err != nil {
			return err
		}
	}
	return nil
}

// The accessors below follow proto3: a field with another wire type than
// its declaration is an unknown field (ignored), and the last occurrence of
// a scalar wins.

func (f field) str(num protowire.Number, dst *string) error {
	if f.num != num || f.typ != protowire.BytesType {
		return nil
	}
	if !utf8.Valid(f.b) {
		return fmt.Errorf("string field %d contains invalid UTF-8", num)
	}
	*dst = string(f.b)
	return nil
}

func (f field) bytes(num protowire.Number, dst *[]byte) {
	if f.num == num && f.typ == protowire.BytesType {
		*dst = append([]byte{}, f.b...)
	}
}

func (f field) int64(num protowire.Number, dst *int64) {
	if f.num == num && f.typ == protowire.VarintType {
		*dst = int64(f.v)
	}
}

func (f field) uint32(num protowire.Number, dst *uint32) {
	if f.num == num && f.typ == protowire.VarintType {
		*dst = uint32(f.v)
	}
}

// proto3 leaves fields with their zero value out.

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendBytes(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// ------------------------------------------------ examples/grpc kv.proto

// GetRequest is message GetRequest { string key = 1; } (both protocols).
type GetRequest struct{ Key string }

func (m GetRequest) Marshal() []byte { return appendString(nil, 1, m.Key) }

func (m *GetRequest) Unmarshal(b []byte) error {
	return walk(b, func(f field) error { return f.str(1, &m.Key) })
}

// KVGetResponse is message GetResponse { bytes value = 1; } of examples/grpc.
type KVGetResponse struct{ Value []byte }

func (m KVGetResponse) Marshal() []byte { return appendBytes(nil, 1, m.Value) }

func (m *KVGetResponse) Unmarshal(b []byte) error {
	return walk(b, func(f field) error { f.bytes(1, &m.Value); return nil })
}

// KVPutRequest is message PutRequest { string key = 1; bytes value = 2; }
// of examples/grpc.
type KVPutRequest struct {
	Key   string
	Value []byte
}

func (m KVPutRequest) Marshal() []byte {
	return appendBytes(appendString(nil, 1, m.Key), 2, m.Value)
}

func (m *KVPutRequest) Unmarshal(b []byte) error {
	return walk(b, func(f field) error {
		f.bytes(2, &m.Value)
		return f.str(1, &m.Key)
	})
}

// Empty is message Empty {} (both protocols).  Unmarshalling only checks
// that the bytes parse.
type Empty struct{}

func (Empty) Marshal() []byte { return []byte{} }

func (*Empty) Unmarshal(b []byte) error {
	return walk(b, func(field) error { return nil })
}

// ------------------------------------------------ examples/bidirectional kv.proto

// CounterGetResponse is message GetResponse { int64 value = 1; } of
// examples/bidirectional.
type CounterGetResponse struct{ Value int64 }

func (m CounterGetResponse) Marshal() []byte { return appendVarint(nil, 1, uint64(m.Value)) }

func (m *CounterGetResponse) Unmarshal(b []byte) error {
	return walk(b, func(f field) error { f.int64(1, &m.Value); return nil })
}

// CounterPutRequest is message PutRequest { uint32 add_server = 1;
// string key = 2; int64 value = 3; } of examples/bidirectional.
type CounterPutRequest struct {
	AddServer uint32
	Key       string
	Value     int64
}

func (m CounterPutRequest) Marshal() []byte {
	b := appendVarint(nil, 1, uint64(m.AddServer))
	b = appendString(b, 2, m.Key)
	return appendVarint(b, 3, uint64(m.Value))
}

func (m *CounterPutRequest) Unmarshal(b []byte) error {
	return walk(b, func(f field) error {
		f.uint32(1, &m.AddServer)
		f.int64(3, &m.Value)
		return f.str(2, &m.Key)
	})
}

// SumRequest is message SumRequest { int64 a = 1; int64 b = 2; }.
type SumRequest struct{ A, B int64 }

func (m SumRequest) Marshal() []byte {
	return appendVarint(appendVarint(nil, 1, uint64(m.A)), 2, uint64(m.B))
}

func (m *SumRequest) Unmarshal(b []byte) error {
	return walk(b, func(f field) error {
		f.int64(1, &m.A)
		f.int64(2, &m.B)
		return nil
	})
}

// SumResponse is message SumResponse { int64 r = 1; }.
type SumResponse struct{ R int64 }

func (m SumResponse) Marshal() []byte { return appendVarint(nil, 1, uint64(m.R)) }

func (m *SumResponse) Unmarshal(b []byte) error {
	return walk(b, func(f field) error { f.int64(1, &m.R); return nil })
}

// errNotBytes is returned by the codecs for a value that is not *[]byte.
var errNotBytes = errors.New("kvshared: codec expects *[]byte")
