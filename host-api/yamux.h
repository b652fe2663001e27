/*
 * yamux.h - hashicorp/yamux (spec.md, version 0) as a sans-I/O state
 * machine: bytes in (ymx_feed), events out (callbacks), bytes out (the
 * session's output queue).  No sockets, no threads, no clock: the caller
 * owns the I/O and calls everything from one thread.  librpcplugin's
 * multiplexer (mux.c) drives it; tests/unit/test_yamux.c and
 * tests/fuzz/fuzz_yamux.c drive it directly.
 *
 * Frame: version(8) type(8) flags(16) stream_id(32) length(32), big
 * endian, 12 bytes, then `length` bytes of payload for DATA only.
 *
 * What follows yamux's Go implementation (hashicorp/yamux, the peer of
 * go-plugin), where the spec is silent:
 *  - Stream ids: the client uses odd ids, the server even; 0 is the
 *    session.  A SYN on an id of the wrong parity, on 0, or on an id
 *    that is already open is a protocol error.
 *  - A frame (not SYN) for an unknown stream id is ignored; a DATA
 *    payload for it is skipped.
 *  - Each stream starts with a 256 KiB window each way.  DATA beyond the
 *    receive window is a protocol error.  A WINDOW_UPDATE adds its length
 *    to the send window (the sum is capped at 2^32-1).
 *  - A window update is sent when the bytes consumed since the last one
 *    reach half the window (or with a SYN/ACK/FIN flag that goes out
 *    anyway).
 *  - Version other than 0, an unknown type: protocol error.
 *  - PING with SYN is answered at once with a PING ACK carrying the same
 *    opaque value; a PING ACK is reported (on_pong).
 *  - GO_AWAY: reported; no stream may be opened afterwards (ymx_open
 *    fails), the existing ones go on.  After our own GO_AWAY a peer's SYN
 *    is refused with RST (Go's incomingStream).
 *  - Flags are handled before a frame's payload or delta (Go's
 *    processFlags): SYN (on_open), ACK (on_ack), RST (on_reset; a payload
 *    is skipped).  FIN comes last, after the DATA payload it ends or the
 *    WINDOW_UPDATE delta it carries.
 *  - After the peer's FIN, DATA with a payload or a second FIN on that
 *    stream is a protocol error (Go: a second FIN is; data after FIN it
 *    never sends).  A SYN carrying more DATA than the initial window is
 *    one too, accepted or not.
 * A protocol error queues a GO_AWAY with code 1 (protocol error) and
 * makes ymx_feed return YMX_EPROTO; every later ymx_feed returns it too,
 * and so does every call that would queue output or change a stream
 * (ymx_open, ymx_write, ymx_consumed, ymx_close, ymx_reset, ymx_ping,
 * ymx_go_away): nothing is queued after the GO_AWAY.  The caller flushes
 * the output and closes the connection.
 */
#ifndef RPCPLUGIN_YAMUX_H
#define RPCPLUGIN_YAMUX_H

#include <stddef.h>
#include <stdint.h>

#define YMX_HEADER_SIZE 12
#define YMX_INITIAL_WINDOW (256u * 1024u)

enum { YMX_DATA = 0, YMX_WINDOW_UPDATE = 1, YMX_PING = 2, YMX_GO_AWAY = 3 };
enum { YMX_SYN = 1, YMX_ACK = 2, YMX_FIN = 4, YMX_RST = 8 };
enum { YMX_GOAWAY_NORMAL = 0, YMX_GOAWAY_PROTO = 1, YMX_GOAWAY_INTERNAL = 2 };

/* Return codes (negative). */
#define YMX_OK 0
#define YMX_EPROTO (-1)   /* the peer broke the protocol; session is over */
#define YMX_ENOSTREAM (-2) /* no such stream (or it is gone) */
#define YMX_ECLOSED (-3)  /* this side already sent FIN / RST on it */
#define YMX_EGOAWAY (-4)  /* a GO_AWAY was sent or received: no new stream */
#define YMX_ELIMIT (-5)   /* too many streams */
#define YMX_ENOMEM (-6)
#define YMX_EINVAL (-7)

typedef struct ymx_header {
  uint8_t version;
  uint8_t type;
  uint16_t flags;
  uint32_t stream_id;
  uint32_t length;
} ymx_header;

/* Pure codec.  encode writes exactly 12 bytes; decode reads exactly 12 and
 * does not validate (ymx_header_check does: 0, or YMX_EPROTO for a
 * version other than 0 or a type above 3). */
void ymx_header_encode(const ymx_header *h, uint8_t out[YMX_HEADER_SIZE]);
void ymx_header_decode(const uint8_t in[YMX_HEADER_SIZE], ymx_header *h);
int ymx_header_check(const ymx_header *h);

/* What the session reports while ymx_feed runs (all optional; ud is the
 * pointer given to ymx_new), and on_closed also from ymx_close.  The
 * callbacks may call ymx_write, ymx_consumed, ymx_close, ymx_reset,
 * ymx_open, ymx_ping, ymx_go_away on the same session, even on the
 * stream being reported (the session looks it up again afterwards; the
 * rest of a payload of a stream reset meanwhile is skipped), but not
 * ymx_free; ymx_feed from a callback returns YMX_EINVAL. */
typedef struct ymx_callbacks {
  /* The peer opened stream id (SYN).  Return 0 to accept it (an ACK goes
   * out, as a WINDOW_UPDATE), anything else to refuse it (an RST goes
   * out and the stream is forgotten).  Without the callback every stream
   * is accepted. */
  int (*on_open)(void *ud, uint32_t id);
  /* Payload for stream id, within its receive window.  The bytes count
   * against the window until the caller reports them with ymx_consumed.
   * A DATA frame may arrive in several calls (as the input arrives). */
  void (*on_data)(void *ud, uint32_t id, const uint8_t *p, size_t n);
  /* The peer half-closed stream id (FIN): no more data will come. */
  void (*on_fin)(void *ud, uint32_t id);
  /* The peer reset stream id (RST); the stream is already forgotten. */
  void (*on_reset)(void *ud, uint32_t id);
  /* The send window of stream id grew (a WINDOW_UPDATE with a length
   * above 0); ymx_send_window tells how much may be written. */
  void (*on_window)(void *ud, uint32_t id);
  /* The peer acknowledged stream id (ACK): once, for a stream we
   * opened. */
  void (*on_ack)(void *ud, uint32_t id);
  /* Both sides have sent FIN on stream id; the session forgot it.  From
   * ymx_feed (the peer's FIN came last) or from ymx_close (ours did). */
  void (*on_closed)(void *ud, uint32_t id);
  /* The peer sent GO_AWAY with this code. */
  void (*on_go_away)(void *ud, uint32_t code);
  /* The peer answered ymx_ping(opaque). */
  void (*on_pong)(void *ud, uint32_t opaque);
} ymx_callbacks;

typedef struct ymx_config {
  int is_client;        /* 1: odd stream ids (yamux.Client), 0: even */
  uint32_t max_streams; /* streams open at once, both directions; a SYN
                         * beyond it is refused with RST.  0: 1024 */
} ymx_config;

typedef struct ymx_session ymx_session;

ymx_session *ymx_new(const ymx_config *cfg, const ymx_callbacks *cb,
                     void *ud);
void ymx_free(ymx_session *s);

/* Consume n bytes of input (any split: a header or a payload may arrive
 * a byte at a time).  Returns YMX_OK or YMX_EPROTO; also YMX_ENOMEM (out
 * of memory for a reply: the session is over, sticky like YMX_EPROTO,
 * without a GO_AWAY), and YMX_EINVAL when called from a callback. */
int ymx_feed(ymx_session *s, const uint8_t *p, size_t n);

/* The output queue: bytes to write to the connection, in order.  peek
 * gives the first contiguous piece (*len 0: nothing to write; this
 * implementation keeps one piece, so it is all that is pending); drop
 * removes n bytes from the front after they were written.  Memory: the
 * queue holds what is pending, compacted as it drains. */
size_t ymx_out_pending(const ymx_session *s);
void ymx_out_peek(const ymx_session *s, const uint8_t **p, size_t *len);
void ymx_out_drop(ymx_session *s, size_t n);

/* Open a stream (a WINDOW_UPDATE with SYN is queued); its id to *id.
 * YMX_EGOAWAY, YMX_ELIMIT (max_streams, or the ids ran out). */
int ymx_open(ymx_session *s, uint32_t *id);

/* Queue up to n bytes of DATA on stream id: as much as its send window
 * allows, in frames of at most 64 KiB.  Returns the number of bytes
 * taken (0 when the window is closed), or YMX_ENOSTREAM / YMX_ECLOSED. */
long ymx_write(ymx_session *s, uint32_t id, const uint8_t *p, size_t n);
/* Bytes stream id may send now (0 when unknown). */
uint32_t ymx_send_window(const ymx_session *s, uint32_t id);

/* The caller has passed on n bytes of stream id's received data: they
 * leave its receive window (a WINDOW_UPDATE goes out when due).
 * YMX_ENOSTREAM, YMX_EINVAL (more than was received and not consumed). */
int ymx_consumed(ymx_session *s, uint32_t id, size_t n);

/* Half-close stream id (FIN, as a WINDOW_UPDATE that also carries any
 * consumption not yet announced).  After both sides' FIN the stream is
 * forgotten (on_closed, from here when the peer's FIN came first).
 * YMX_ENOSTREAM, YMX_ECLOSED (FIN already sent). */
int ymx_close(ymx_session *s, uint32_t id);
/* Reset stream id (RST); it is forgotten at once (no callback); what
 * the peer still sends on it is skipped.  YMX_ENOSTREAM. */
int ymx_reset(ymx_session *s, uint32_t id);

/* PING with SYN and this opaque value. */
int ymx_ping(ymx_session *s, uint32_t opaque);
/* GO_AWAY with this code; no ymx_open afterwards. */
int ymx_go_away(ymx_session *s, uint32_t code);

/* Introspection for tests and stats. */
size_t ymx_stream_count(const ymx_session *s);
/* Bytes of stream id received and not yet consumed (0 when unknown). */
uint32_t ymx_recv_buffered(const ymx_session *s, uint32_t id);
int ymx_remote_go_away(const ymx_session *s);

#endif
