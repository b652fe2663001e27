package muxclient

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/yamux"
)

// Muxer is go-plugin v1.8.0's GRPCClientMuxer: it dials the plugin's
// address once, eagerly, and runs a yamux client session on that
// connection.  Dial opens a new stream (the main gRPC connection and every
// brokered dial); Listener(id) returns a listener whose Accept waits for a
// knock on id and then takes the next stream the plugin opens.
type Muxer struct {
	session *yamux.Session
	sniff   *sniffConn

	mu        sync.Mutex
	listeners map[uint32]*blockedListener

	dials, opened, accepted int64 // net.Dial calls, session.Open, session.Accept
}

// NewMuxer makes the one connection and the yamux session over it.
func NewMuxer(network, address string) (*Muxer, error) {
	m := &Muxer{listeners: make(map[uint32]*blockedListener)}
	atomic.AddInt64(&m.dials, 1)
	conn, err := net.Dial(network, address)
	if err != nil {
		return nil, err
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetKeepAlive(true)
	}
	m.sniff = &sniffConn{Conn: conn}
	m.session, err = yamux.Client(m.sniff, yamux.DefaultConfig())
	if err != nil {
		conn.Close()
		return nil, err
	}
	return m, nil
}

// Session is the yamux session.
func (m *Muxer) Session() *yamux.Session { return m.session }

// Dial opens a new stream (no knock: the caller knocks first if it wants
// a brokered service).
func (m *Muxer) Dial() (net.Conn, error) {
	s, err := m.session.Open()
	if err != nil {
		return nil, fmt.Errorf("error dialling new client stream: %w", err)
	}
	atomic.AddInt64(&m.opened, 1)
	return s, nil
}

// Listener registers a knock-blocked listener for id; Close unregisters it
// and makes a blocked Accept return io.EOF.
func (m *Muxer) Listener(id uint32) net.Listener {
	ln := &blockedListener{m: m, id: id, wait: make(chan struct{}, 16), done: make(chan struct{})}
	m.mu.Lock()
	m.listeners[id] = ln
	m.mu.Unlock()
	return ln
}

// AcceptKnock lets id's listener accept the next incoming stream.
func (m *Muxer) AcceptKnock(id uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ln, ok := m.listeners[id]
	if !ok {
		return fmt.Errorf("no listener for id %d", id)
	}
	select {
	case ln.wait <- struct{}{}:
		return nil
	default:
		return fmt.Errorf("listener for id %d has too many unaccepted knocks", id)
	}
}

// Close closes the session (and the connection).
func (m *Muxer) Close() error { return m.session.Close() }

// Stats: net.Dial calls, streams opened, streams accepted.
func (m *Muxer) Stats() (dials, opened, accepted int64) {
	return atomic.LoadInt64(&m.dials), atomic.LoadInt64(&m.opened), atomic.LoadInt64(&m.accepted)
}

// GoAway reports whether a yamux GoAway frame came from the plugin, and
// its code (0 normal, 1 protocol error, 2 internal error).
func (m *Muxer) GoAway() (seen bool, code uint32) { return m.sniff.goAway() }

// blockedListener is go-plugin's blockedClientListener: each knock lets
// one Accept through to session.Accept.  Unlike go-plugin's (whose Close
// does nothing and which stays registered), Close here unregisters it, so
// a later knock on the id gets "no listener".
type blockedListener struct {
	m    *Muxer
	id   uint32
	wait chan struct{}
	done chan struct{}
	once sync.Once
}

func (b *blockedListener) Accept() (net.Conn, error) {
	select {
	case <-b.wait:
		c, err := b.m.session.Accept()
		if err == nil {
			atomic.AddInt64(&b.m.accepted, 1)
		}
		return c, err
	case <-b.done:
		return nil, io.EOF
	}
}

func (b *blockedListener) Addr() net.Addr { return b.m.session.Addr() }

func (b *blockedListener) Close() error {
	b.once.Do(func() {
		close(b.done)
		b.m.mu.Lock()
		if b.m.listeners[b.id] == b {
			delete(b.m.listeners, b.id)
		}
		b.m.mu.Unlock()
	})
	return nil // the session is the muxer's to close
}

// sniffConn watches the yamux frames read from the plugin, to tell whether
// it sent a GoAway (Debian's yamux keeps that unexported).  A frame header
// is 12 bytes: version, type (0 data, 1 window update, 2 ping, 3 go away),
// flags (2), stream id (4), length (4); only data frames carry a payload.
type sniffConn struct {
	net.Conn
	mu      sync.Mutex
	hdr     [12]byte
	hdrN    int
	skip    uint32
	goAways int
	code    uint32
}

func (c *sniffConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	for b := p[:n]; len(b) > 0; {
		if c.skip > 0 { // data frame payload
			k := uint32(len(b))
			if k > c.skip {
				k = c.skip
			}
			c.skip -= k
			b = b[k:]
			continue
		}
		k := copy(c.hdr[c.hdrN:], b)
		c.hdrN += k
		b = b[k:]
		if c.hdrN < 12 {
			break
		}
		c.hdrN = 0
		length := binary.BigEndian.Uint32(c.hdr[8:12])
		switch c.hdr[1] {
		case 0:
			c.skip = length
		case 3:
			c.goAways++
			c.code = length
		}
	}
	c.mu.Unlock()
	return n, err
}

func (c *sniffConn) goAway() (bool, uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.goAways > 0, c.code
}
