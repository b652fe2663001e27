package muxclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"rpcplugin-interop/kvshared"
)

// KnockTimeout is go-plugin's fixed wait for a knock's ack.
const KnockTimeout = 5 * time.Second

// DialGRPC is go-plugin's dialGRPCConn: a non-blocking grpc.Dial of
// "unused" through dialer, TLS when tlsCfg is set, no message size limits.
func DialGRPC(tlsCfg *tls.Config, dialer func(context.Context, string) (net.Conn, error)) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithContextDialer(dialer),
		grpc.FailOnNonTempDialError(true),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(math.MaxInt32)),
	}
	if tlsCfg == nil {
		opts = append(opts, grpc.WithInsecure())
	} else {
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	}
	return grpc.Dial("unused", opts...)
}

// Connect is go-plugin's newGRPCClient with multiplexing: the muxer (the
// one net.Dial), the main connection (each (re)connect opens a new stream,
// without a knock) and the broker's StartStream on it.
func Connect(h Handshake, tlsCfg *tls.Config, logf func(string, ...interface{})) (*Muxer, *grpc.ClientConn, *Broker, error) {
	m, err := NewMuxer(h.Network, h.Address)
	if err != nil {
		return nil, nil, nil, err
	}
	conn, err := DialGRPC(tlsCfg, func(context.Context, string) (net.Conn, error) { return m.Dial() })
	if err != nil {
		m.Close()
		return nil, nil, nil, err
	}
	return m, conn, NewBroker(conn, m, tlsCfg, logf), nil
}

// Broker is the client side of go-plugin v1.8.0's GRPCBroker in multiplex
// mode, on one plugin.GRPCBroker/StartStream stream of the main connection.
type Broker struct {
	m      *Muxer
	tls    *tls.Config
	logf   func(string, ...interface{})
	nextID uint32

	ready  chan struct{} // closed once the stream is open (or failed)
	stream grpc.ClientStream
	err    error // why the stream could not be opened, or ended
	cancel context.CancelFunc
	sendMu sync.Mutex

	dialMu  sync.Mutex // one knock-and-open at a time (go-plugin's dialMutex)
	mu      sync.Mutex
	pending map[uint32]chan ConnInfo // knocks waiting for their ack

	KnocksIn, AcksOut, AckErrorsOut, Stray int64 // counters
}

var startStreamDesc = grpc.StreamDesc{StreamName: "StartStream", ServerStreams: true, ClientStreams: true}

// NewBroker opens StartStream in the background (as go-plugin does) and
// runs the receive loop.
func NewBroker(conn *grpc.ClientConn, m *Muxer, tlsCfg *tls.Config, logf func(string, ...interface{})) *Broker {
	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{m: m, tls: tlsCfg, logf: logf, ready: make(chan struct{}), cancel: cancel,
		pending: make(map[uint32]chan ConnInfo)}
	go func() {
		st, err := conn.NewStream(ctx, &startStreamDesc, "/plugin.GRPCBroker/StartStream",
			grpc.ForceCodec(kvshared.RawCodec{}))
		b.stream = st
		b.setErr(err)
		close(b.ready)
		if err == nil {
			b.run()
		}
	}()
	return b
}

// Err is why the broker stream could not be opened or why it ended.
func (b *Broker) Err() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

func (b *Broker) setErr(err error) {
	b.mu.Lock()
	b.err = err
	b.mu.Unlock()
}

// run is GRPCBroker.Run: knocks from the plugin are answered, acks go to
// the pending knock of this side.
func (b *Broker) run() {
	for {
		var raw []byte
		if err := b.stream.RecvMsg(&raw); err != nil {
			b.setErr(fmt.Errorf("broker stream ended: %w", err))
			return
		}
		ci, err := UnmarshalConnInfo(raw)
		if err != nil {
			b.logf("broker: undecodable ConnInfo: %v", err)
			atomic.AddInt64(&b.Stray, 1)
			continue
		}
		switch {
		case ci.Knock != nil && ci.Knock.Knock && !ci.Knock.Ack:
			// The plugin wants to dial a service this side serves:
			// listenForKnocks + AcceptKnock, then the ack (with
			// AcceptKnock's error when there is no listener).
			atomic.AddInt64(&b.KnocksIn, 1)
			ackErr := ""
			if err := b.m.AcceptKnock(ci.ServiceID); err != nil {
				ackErr = err.Error()
				atomic.AddInt64(&b.AckErrorsOut, 1)
			}
			if err := b.send(ConnInfo{ServiceID: ci.ServiceID,
				Knock: &Knock{Knock: true, Ack: true, Error: ackErr}}); err != nil {
				b.logf("broker: error sending back knock acknowledgement: %v", err)
			}
			atomic.AddInt64(&b.AcksOut, 1)
		case ci.Knock != nil:
			b.mu.Lock()
			ch := b.pending[ci.ServiceID]
			b.mu.Unlock()
			if ch == nil {
				b.logf("broker: unexpected message (nobody knocked): %v", ci)
				atomic.AddInt64(&b.Stray, 1)
				continue
			}
			select {
			case ch <- ci:
			default:
			}
		default:
			// Plain brokering (ConnInfo with an address) has no place in
			// multiplexed mode.
			b.logf("broker: unexpected ConnInfo without knock in multiplexed mode: %v", ci)
			atomic.AddInt64(&b.Stray, 1)
		}
	}
}

// send writes one ConnInfo on the stream (serialised), waiting for the
// stream to be open.
func (b *Broker) send(ci ConnInfo) error {
	select {
	case <-b.ready:
	case <-time.After(KnockTimeout):
		return errors.New("broker stream not open after 5s")
	}
	if b.stream == nil {
		return fmt.Errorf("broker stream could not be opened: %w", b.Err())
	}
	raw := ci.Marshal()
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	return b.stream.SendMsg(&raw)
}

// knock is GRPCBroker.knock: {id, knock} and up to 5 s for {id, knock, ack}
// without error.
func (b *Broker) knock(id uint32) error {
	ch := make(chan ConnInfo, 1)
	b.mu.Lock()
	b.pending[id] = ch
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.pending, id)
		b.mu.Unlock()
	}()
	if err := b.send(ConnInfo{ServiceID: id, Knock: &Knock{Knock: true}}); err != nil {
		return err
	}
	select {
	case msg := <-ch:
		if msg.ServiceID != id {
			return fmt.Errorf("handshake failed for multiplexing on id %d; got response for %d", id, msg.ServiceID)
		}
		if msg.Knock == nil || !msg.Knock.Knock || !msg.Knock.Ack {
			return fmt.Errorf("handshake failed for multiplexing on id %d; expected knock and ack, but got %v", id, msg)
		}
		if msg.Knock.Error != "" {
			return fmt.Errorf("failed to knock for id %d: %s", id, msg.Knock.Error)
		}
		return nil
	case <-time.After(KnockTimeout):
		return fmt.Errorf("timeout waiting for multiplexing knock handshake on id %d", id)
	}
}

// Dial is GRPCBroker.Dial in multiplex mode: a connection whose dialer
// knocks for id, then opens a stream (for every (re)connect).
func (b *Broker) Dial(id uint32) (*grpc.ClientConn, error) {
	return DialGRPC(b.tls, func(context.Context, string) (net.Conn, error) {
		b.dialMu.Lock()
		defer b.dialMu.Unlock()
		if err := b.knock(id); err != nil {
			return nil, fmt.Errorf("failed to knock before dialling client: %w", err)
		}
		return b.m.Dial()
	})
}

// NextId returns a new broker id.
func (b *Broker) NextId() uint32 { return atomic.AddUint32(&b.nextID, 1) }

// AcceptAndServe is GRPCBroker.AcceptAndServe in multiplex mode: a
// knock-blocked listener for id (no ConnInfo is sent) served by the
// server newServer makes (with the TLS options under AutoMTLS).  stop ends
// the server and unregisters the id.
func (b *Broker) AcceptAndServe(id uint32, newServer func([]grpc.ServerOption) *grpc.Server) (stop func()) {
	ln := b.m.Listener(id)
	var opts []grpc.ServerOption
	if b.tls != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(b.tls)))
	}
	s := newServer(opts)
	served := make(chan struct{})
	go func() { s.Serve(ln); close(served) }()
	return func() {
		s.Stop()
		ln.Close()
		<-served
	}
}

// Close ends the broker stream (go-plugin's broker.Close).
func (b *Broker) Close() { b.cancel() }
