/*
 * test_yamux.c - the yamux state machine (host-api/yamux.c): the header
 * codec byte for byte, two sessions wired back to back (open, ACK, data
 * both ways, flow control at the window's exact edges, FIN, RST, refusal,
 * limits, ping, go away), every protocol error, callbacks that re-enter
 * the session, and the exact frames Go's hashicorp/yamux sends.
 */
#include <stdlib.h>

#include "check.h"
#include "yamux.h"

#define KIB 1024u

/* ------------------------------------------------------------ harness */

/* One side: its session, a log of the callbacks as text ("open:1 data:1:5
 * ..."), the payload received (all streams, in order), and knobs that make
 * callbacks re-enter the session. */
typedef struct peer {
  ymx_session *s;
  char *log; /* grows: a byte-at-a-time run logs 70000 events */
  size_t log_len, log_cap;
  uint8_t *rx;
  size_t rx_len, rx_cap;
  int refuse;        /* on_open returns this */
  int reset_in_data; /* on_data resets the stream */
  int reset_in_open; /* on_open resets the stream, then accepts */
  int reset_in_ack;  /* on_ack resets the stream */
  int write_in_open; /* on_open writes "hi" */
  int close_in_fin;  /* on_fin closes the stream */
  int feed_in_data;  /* on_data calls ymx_feed: must be refused */
  int nested_feed_rc;
  int consume_in_data; /* on_data consumes what it got at once */
} peer;

static void logf_(peer *p, const char *kind, uint32_t id, long long v,
                  int with_v) {
  char item[64];
  int n = with_v ? snprintf(item, sizeof item, "%s:%u:%lld ", kind, id, v)
                 : snprintf(item, sizeof item, "%s:%u ", kind, id);
  if (n <= 0 || (size_t)n >= sizeof item) return;
  if (p->log_len + (size_t)n + 1 > p->log_cap) {
    size_t cap = p->log_cap ? p->log_cap * 2 : 4096;
    char *nb;
    while (cap < p->log_len + (size_t)n + 1) cap *= 2;
    nb = realloc(p->log, cap);
    if (!nb) return;
    p->log = nb;
    p->log_cap = cap;
  }
  memcpy(p->log + p->log_len, item, (size_t)n + 1);
  p->log_len += (size_t)n;
}

static int cb_open(void *ud, uint32_t id) {
  peer *p = ud;
  logf_(p, "open", id, 0, 0);
  if (p->reset_in_open) CHECK_EQ_INT(ymx_reset(p->s, id), YMX_OK);
  if (p->write_in_open)
    CHECK_EQ_INT(ymx_write(p->s, id, (const uint8_t *)"hi", 2), 2);
  return p->refuse;
}

static void cb_data(void *ud, uint32_t id, const uint8_t *d, size_t n) {
  peer *p = ud;
  logf_(p, "data", id, (long long)n, 1);
  if (p->rx_len + n > p->rx_cap) {
    size_t cap = p->rx_cap ? p->rx_cap : 4096;
    uint8_t *nb;
    while (cap < p->rx_len + n) cap *= 2;
    nb = realloc(p->rx, cap);
    if (!nb) return;
    p->rx = nb;
    p->rx_cap = cap;
  }
  memcpy(p->rx + p->rx_len, d, n);
  p->rx_len += n;
  if (p->reset_in_data) CHECK_EQ_INT(ymx_reset(p->s, id), YMX_OK);
  if (p->consume_in_data) CHECK_EQ_INT(ymx_consumed(p->s, id, n), YMX_OK);
  if (p->feed_in_data) p->nested_feed_rc = ymx_feed(p->s, d, 1);
}

static void cb_fin(void *ud, uint32_t id) {
  peer *p = ud;
  logf_(p, "fin", id, 0, 0);
  if (p->close_in_fin) CHECK_EQ_INT(ymx_close(p->s, id), YMX_OK);
}

static void cb_reset(void *ud, uint32_t id) {
  logf_(ud, "reset", id, 0, 0);
}
static void cb_window(void *ud, uint32_t id) {
  logf_(ud, "window", id, 0, 0);
}
static void cb_ack(void *ud, uint32_t id) {
  peer *p = ud;
  logf_(p, "ack", id, 0, 0);
  if (p->reset_in_ack) CHECK_EQ_INT(ymx_reset(p->s, id), YMX_OK);
}
static void cb_closed(void *ud, uint32_t id) {
  logf_(ud, "closed", id, 0, 0);
}
static void cb_go_away(void *ud, uint32_t code) {
  logf_(ud, "goaway", code, 0, 0);
}
static void cb_pong(void *ud, uint32_t opaque) {
  logf_(ud, "pong", opaque, 0, 0);
}

static const ymx_callbacks callbacks = {cb_open,   cb_data,    cb_fin,
                                        cb_reset,  cb_window,  cb_ack,
                                        cb_closed, cb_go_away, cb_pong};

static void peer_init(peer *p, int is_client, uint32_t max_streams) {
  ymx_config cfg;
  memset(p, 0, sizeof *p);
  p->log = calloc(1, 1);
  p->log_cap = 1;
  cfg.is_client = is_client;
  cfg.max_streams = max_streams;
  p->s = ymx_new(&cfg, &callbacks, p);
  CHECK(p->s != NULL);
}

static void peer_free(peer *p) {
  ymx_free(p->s);
  free(p->rx);
  free(p->log);
}

static void log_clear(peer *p) {
  p->log_len = 0;
  p->log[0] = 0;
}

/* Moves a's output into b, `step` bytes per ymx_feed (0: all at once).
 * Returns the last ymx_feed result. */
static int pump_step(peer *a, peer *b, size_t step) {
  const uint8_t *q;
  size_t len;
  int rc = YMX_OK;
  ymx_out_peek(a->s, &q, &len);
  while (len > 0 && rc == YMX_OK) {
    size_t n = step && step < len ? step : len;
    rc = ymx_feed(b->s, q, n);
    ymx_out_drop(a->s, n);
    ymx_out_peek(a->s, &q, &len);
  }
  return rc;
}

static int pump(peer *a, peer *b) {
  return pump_step(a, b, 0);
}

/* Both ways until nothing moves. */
static void pump_all(peer *a, peer *b) {
  int i;
  for (i = 0; i < 100; i++) {
    if (!ymx_out_pending(a->s) && !ymx_out_pending(b->s)) return;
    CHECK_EQ_INT(pump(a, b), YMX_OK);
    CHECK_EQ_INT(pump(b, a), YMX_OK);
  }
  CHECK(!"pump_all did not settle");
}

/* The session's pending output equals these bytes exactly; then dropped. */
static int out_is(ymx_session *s, const uint8_t *want, size_t n) {
  const uint8_t *q;
  size_t len;
  int ok;
  ymx_out_peek(s, &q, &len);
  ok = len == n && (n == 0 || memcmp(q, want, n) == 0);
  if (!ok) {
    size_t i;
    fprintf(stderr, "  output (%zu bytes):", len);
    for (i = 0; i < len && i < 48; i++) fprintf(stderr, " %02x", q[i]);
    fprintf(stderr, "\n  wanted (%zu bytes):", n);
    for (i = 0; i < n && i < 48; i++) fprintf(stderr, " %02x", want[i]);
    fprintf(stderr, "\n");
  }
  ymx_out_drop(s, len);
  return ok;
}

static size_t frame(uint8_t *out, uint8_t type, uint16_t flags, uint32_t id,
                    uint32_t length) {
  ymx_header h;
  h.version = 0;
  h.type = type;
  h.flags = flags;
  h.stream_id = id;
  h.length = length;
  ymx_header_encode(&h, out);
  return YMX_HEADER_SIZE;
}

static uint8_t pattern(size_t i) {
  return (uint8_t)(i * 7 + (i >> 9));
}

/* -------------------------------------------------------------- codec */

static void test_header_codec(void) {
  static const uint8_t syn3[] = {0, 1, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0};
  static const uint8_t big[] = {0,    0,    0x12, 0x34, 0xde, 0xad,
                                0xbe, 0xef, 0x80, 0x00, 0x00, 0x01};
  uint8_t b[YMX_HEADER_SIZE];
  ymx_header h = {0, YMX_WINDOW_UPDATE, YMX_SYN, 3, 0}, d;
  ymx_header_encode(&h, b);
  CHECK(memcmp(b, syn3, sizeof b) == 0);
  ymx_header_decode(big, &d);
  CHECK_EQ_INT(d.version, 0);
  CHECK_EQ_INT(d.type, YMX_DATA);
  CHECK_EQ_INT(d.flags, 0x1234);
  CHECK_EQ_INT(d.stream_id, 0xdeadbeefu);
  CHECK_EQ_INT(d.length, 0x80000001u);
  ymx_header_encode(&d, b);
  CHECK(memcmp(b, big, sizeof b) == 0);
  CHECK_EQ_INT(ymx_header_check(&d), 0);
  d.type = YMX_GO_AWAY;
  CHECK_EQ_INT(ymx_header_check(&d), 0);
  d.type = 4;
  CHECK_EQ_INT(ymx_header_check(&d), YMX_EPROTO);
  d.type = YMX_PING;
  d.version = 1;
  CHECK_EQ_INT(ymx_header_check(&d), YMX_EPROTO);
}

/* ---------------------------------------------------- open / ACK / data */

static void test_open_ids_and_bytes(void) {
  static const uint8_t syn1[] = {0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0};
  static const uint8_t syn3[] = {0, 1, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0};
  static const uint8_t syn2[] = {0, 1, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0};
  peer c, s;
  uint32_t id = 0;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_out_pending(c.s), 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(id, 1);
  CHECK(out_is(c.s, syn1, sizeof syn1));
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(id, 3);
  CHECK(out_is(c.s, syn3, sizeof syn3));
  CHECK_EQ_INT(ymx_open(s.s, &id), YMX_OK);
  CHECK_EQ_INT(id, 2);
  CHECK(out_is(s.s, syn2, sizeof syn2));
  CHECK_EQ_INT(ymx_stream_count(c.s), 2);
  CHECK_EQ_INT(ymx_send_window(c.s, 1), YMX_INITIAL_WINDOW);
  CHECK_EQ_INT(ymx_send_window(c.s, 5), 0);
  peer_free(&c);
  peer_free(&s);
}

static void test_syn_ack_and_data(void) {
  static const uint8_t ack1[] = {0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0};
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  /* Data may follow the SYN before any ACK (spec: no RTT wait). */
  CHECK_EQ_INT(ymx_write(c.s, id, (const uint8_t *)"hello", 5), 5);
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK(strcmp(s.log, "open:1 data:1:5 ") == 0);
  CHECK(s.rx_len == 5 && memcmp(s.rx, "hello", 5) == 0);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 5);
  CHECK_EQ_INT(ymx_stream_count(s.s), 1);
  /* The ACK: a WINDOW_UPDATE with ACK and delta 0, as Go's AcceptStream. */
  CHECK(out_is(s.s, ack1, sizeof ack1));
  CHECK_EQ_INT(ymx_write(s.s, 1, (const uint8_t *)"world!", 6), 6);
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "data:1:6 ") == 0); /* the ACK went out in out_is */
  /* Again with the ACK on the wire: on_ack, once. */
  log_clear(&c);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(id, 3);
  pump_all(&c, &s);
  CHECK(strcmp(c.log, "ack:3 ") == 0);
  CHECK_EQ_INT(ymx_write(s.s, 3, (const uint8_t *)"x", 1), 1);
  pump_all(&c, &s);
  CHECK(strcmp(c.log, "ack:3 data:3:1 ") == 0);
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 6), YMX_EINVAL);
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 5), YMX_OK);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 0);
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 1), YMX_EINVAL);
  CHECK_EQ_INT(ymx_consumed(s.s, 7, 0), YMX_ENOSTREAM);
  CHECK_EQ_INT(ymx_write(s.s, 7, (const uint8_t *)"x", 1), YMX_ENOSTREAM);
  CHECK_EQ_INT(ymx_out_pending(s.s), 0); /* 5 bytes: no update due */
  peer_free(&c);
  peer_free(&s);
}

/* A writer stops at exactly the window, in 64 KiB frames; the reader's
 * window update goes out when 128 KiB are consumed, not a byte before. */
static void test_flow_control(void) {
  const size_t total = 1024 * KIB + 123;
  uint8_t *src = malloc(total);
  uint8_t want[YMX_HEADER_SIZE];
  peer c, s;
  uint32_t id;
  size_t sent = 0, i;
  const uint8_t *q;
  size_t len;
  long n;
  int rounds = 0;
  for (i = 0; i < total; i++) src[i] = pattern(i);
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  pump_all(&c, &s);
  n = ymx_write(c.s, id, src, total);
  CHECK_EQ_INT(n, 256 * KIB);
  sent = (size_t)n;
  CHECK_EQ_INT(ymx_send_window(c.s, id), 0);
  CHECK_EQ_INT(ymx_write(c.s, id, src + sent, total - sent), 0);
  /* Four DATA frames of 64 KiB. */
  ymx_out_peek(c.s, &q, &len);
  CHECK_EQ_INT(len, 4 * (YMX_HEADER_SIZE + 64 * KIB));
  for (i = 0; i < 4 && len == 4 * (YMX_HEADER_SIZE + 64 * KIB); i++) {
    ymx_header h;
    ymx_header_decode(q + i * (YMX_HEADER_SIZE + 64 * KIB), &h);
    CHECK(h.type == YMX_DATA && h.flags == 0 && h.stream_id == 1 &&
          h.length == 64 * KIB);
  }
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 256 * KIB);
  CHECK_EQ_INT(s.rx_len, 256 * KIB);
  CHECK(memcmp(s.rx, src, 256 * KIB) == 0);
  /* 128 KiB - 1 consumed: nothing yet. */
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 128 * KIB - 1), YMX_OK);
  CHECK_EQ_INT(ymx_out_pending(s.s), 0);
  /* One more byte: WINDOW_UPDATE, flags 0, delta 131072. */
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 1), YMX_OK);
  frame(want, YMX_WINDOW_UPDATE, 0, 1, 128 * KIB);
  ymx_out_peek(s.s, &q, &len);
  CHECK(len == YMX_HEADER_SIZE && memcmp(q, want, len) == 0);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 128 * KIB);
  log_clear(&c);
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "window:1 ") == 0);
  CHECK_EQ_INT(ymx_send_window(c.s, 1), 128 * KIB);
  /* The reader's window is now full again from the writer's view:
   * 128 KiB buffered + 128 KiB announced. */
  n = ymx_write(c.s, id, src + sent, total - sent);
  CHECK_EQ_INT(n, 128 * KIB);
  sent += (size_t)n;
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 256 * KIB);
  /* Then to the end, the reader consuming everything each round. */
  while (sent < total && rounds++ < 100) {
    CHECK_EQ_INT(ymx_consumed(s.s, 1, ymx_recv_buffered(s.s, 1)), YMX_OK);
    pump_all(&c, &s);
    n = ymx_write(c.s, id, src + sent, total - sent);
    CHECK(n > 0);
    if (n <= 0) break;
    sent += (size_t)n;
    pump_all(&c, &s);
    CHECK(ymx_recv_buffered(s.s, 1) <= YMX_INITIAL_WINDOW);
  }
  CHECK_EQ_INT(sent, total);
  CHECK_EQ_INT(s.rx_len, total);
  CHECK(s.rx_len == total && memcmp(s.rx, src, total) == 0);
  peer_free(&c);
  peer_free(&s);
  free(src);
}

/* The whole conversation fed one byte at a time gives the same events as
 * fed at once, and a frame split anywhere still parses. */
static void test_byte_at_a_time(void) {
  peer c, s1, s2;
  uint32_t id;
  uint8_t big[70000];
  size_t i;
  for (i = 0; i < sizeof big; i++) big[i] = pattern(i);
  peer_init(&c, 1, 0);
  peer_init(&s1, 0, 0);
  peer_init(&s2, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_write(c.s, id, big, sizeof big), (long)sizeof big);
  CHECK_EQ_INT(ymx_ping(c.s, 42), YMX_OK);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_write(c.s, id, (const uint8_t *)"abc", 3), 3);
  CHECK_EQ_INT(ymx_close(c.s, 1), YMX_OK);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(c.s, &q, &len);
    CHECK_EQ_INT(ymx_feed(s1.s, q, len), YMX_OK);
  }
  CHECK_EQ_INT(pump_step(&c, &s2, 1), YMX_OK);
  CHECK_EQ_INT(s2.rx_len, sizeof big + 3);
  CHECK(s2.rx_len == sizeof big + 3 && memcmp(s2.rx, big, sizeof big) == 0 &&
        memcmp(s2.rx + sizeof big, "abc", 3) == 0);
  CHECK(s1.rx_len == s2.rx_len && memcmp(s1.rx, s2.rx, s1.rx_len) == 0);
  /* Bulk: the 70000 bytes arrive in two frames (64 KiB + rest). */
  CHECK(strcmp(s1.log,
               "open:1 data:1:65536 data:1:4464 open:3 data:3:3 "
               "fin:1 ") == 0);
  CHECK_CONTAINS(s2.log, "open:1 data:1:1 data:1:1 ");
  CHECK_CONTAINS(s2.log, "open:3 data:3:1 data:3:1 data:3:1 fin:1 ");
  CHECK_EQ_INT(ymx_out_pending(s1.s), ymx_out_pending(s2.s));
  {
    const uint8_t *a, *b;
    size_t la, lb;
    ymx_out_peek(s1.s, &a, &la);
    ymx_out_peek(s2.s, &b, &lb);
    CHECK(la == lb && la > 0 && memcmp(a, b, la) == 0); /* ACKs, PING ACK */
  }
  peer_free(&c);
  peer_free(&s1);
  peer_free(&s2);
}

/* ----------------------------------------------------------- FIN, RST */

static void test_fin_both_ways(void) {
  static const uint8_t fin1[] = {0, 1, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0};
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  pump_all(&c, &s);
  log_clear(&c);
  log_clear(&s);
  CHECK_EQ_INT(ymx_close(c.s, id), YMX_OK);
  CHECK_EQ_INT(ymx_close(c.s, id), YMX_ECLOSED);
  CHECK_EQ_INT(ymx_write(c.s, id, (const uint8_t *)"x", 1), YMX_ECLOSED);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(c.s, &q, &len);
    CHECK(len == sizeof fin1 && memcmp(q, fin1, len) == 0);
  }
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK(strcmp(s.log, "fin:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 1); /* half closed */
  /* The other direction still flows after the peer's FIN. */
  CHECK_EQ_INT(ymx_write(s.s, 1, (const uint8_t *)"late", 4), 4);
  CHECK_EQ_INT(ymx_close(s.s, 1), YMX_OK);
  CHECK(strcmp(s.log, "fin:1 closed:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "ack:1 data:1:4 fin:1 closed:1 ") == 0 ||
        strcmp(c.log, "data:1:4 fin:1 closed:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  CHECK_EQ_INT(ymx_close(c.s, id), YMX_ENOSTREAM);
  CHECK_EQ_INT(ymx_consumed(c.s, id, 0), YMX_ENOSTREAM);
  /* A FIN inside DATA (some implementations send it): the payload first. */
  log_clear(&s);
  {
    uint8_t in[64];
    size_t n = frame(in, YMX_DATA, YMX_SYN | YMX_FIN, 7, 3);
    memcpy(in + n, "end", 3);
    n += 3;
    CHECK_EQ_INT(ymx_feed(s.s, in, n), YMX_OK);
  }
  CHECK(strcmp(s.log, "open:7 data:7:3 fin:7 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 1);
  /* The ACK, the FIN: on_closed from ymx_close, outside ymx_feed. */
  s.close_in_fin = 0;
  CHECK_EQ_INT(ymx_close(s.s, 7), YMX_OK);
  CHECK_CONTAINS(s.log, "fin:7 closed:7 ");
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  peer_free(&c);
  peer_free(&s);
}

static void test_close_inside_on_fin(void) {
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  s.close_in_fin = 1;
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_close(c.s, id), YMX_OK);
  pump_all(&c, &s);
  CHECK(strcmp(s.log, "open:1 fin:1 closed:1 ") == 0);
  CHECK(strcmp(c.log, "ack:1 fin:1 closed:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  peer_free(&c);
  peer_free(&s);
}

static void test_rst_both_ways(void) {
  static const uint8_t rst1[] = {0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0};
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  pump_all(&c, &s);
  CHECK_EQ_INT(ymx_reset(c.s, id), YMX_OK);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  CHECK_EQ_INT(ymx_reset(c.s, id), YMX_ENOSTREAM);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(c.s, &q, &len);
    CHECK(len == sizeof rst1 && memcmp(q, rst1, len) == 0);
  }
  log_clear(&s);
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK(strcmp(s.log, "reset:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  /* Server resets a stream the client opened, with data in flight from
   * the client: that data is skipped, the next frame still parses. */
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  pump_all(&c, &s);
  log_clear(&c);
  log_clear(&s);
  CHECK_EQ_INT(ymx_write(c.s, id, (const uint8_t *)"lost", 4), 4);
  CHECK_EQ_INT(ymx_ping(c.s, 9), YMX_OK);
  CHECK_EQ_INT(ymx_reset(s.s, id), YMX_OK);
  pump_all(&c, &s);
  CHECK(strcmp(c.log, "reset:3 pong:9 ") == 0);
  CHECK(strcmp(s.log, "") == 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  peer_free(&c);
  peer_free(&s);
}

static void test_refuse_and_limits(void) {
  static const uint8_t rst1[] = {0, 1, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0};
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 2);
  peer_init(&s, 0, 2);
  s.refuse = 1;
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_write(c.s, id, (const uint8_t *)"data", 4), 4);
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK(strcmp(s.log, "open:1 ") == 0); /* the payload was skipped */
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(s.s, &q, &len);
    CHECK(len == sizeof rst1 && memcmp(q, rst1, len) == 0);
  }
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "reset:1 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  /* max_streams 2: the client cannot open a third. */
  s.refuse = 0;
  log_clear(&c);
  log_clear(&s);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_ELIMIT);
  pump_all(&c, &s);
  CHECK_EQ_INT(ymx_stream_count(s.s), 2);
  /* The server holds 2 (the client's); a third SYN, from a raw peer whose
   * limit is larger, is refused with RST and is no protocol error. */
  {
    peer c2;
    peer_init(&c2, 1, 10);
    CHECK_EQ_INT(ymx_open(c2.s, &id), YMX_OK);
    CHECK_EQ_INT(ymx_open(c2.s, &id), YMX_OK);
    CHECK_EQ_INT(ymx_open(c2.s, &id), YMX_OK);
    CHECK_EQ_INT(id, 5);
    peer_free(&s);
    peer_init(&s, 0, 2);
    pump_all(&c2, &s);
    CHECK(strcmp(s.log, "open:1 open:3 ") == 0);
    CHECK(strcmp(c2.log, "ack:1 ack:3 reset:5 ") == 0);
    CHECK_EQ_INT(ymx_stream_count(s.s), 2);
    CHECK_EQ_INT(ymx_stream_count(c2.s), 2);
    /* A slot frees up: the next is accepted. */
    CHECK_EQ_INT(ymx_reset(c2.s, 1), YMX_OK);
    CHECK_EQ_INT(ymx_open(c2.s, &id), YMX_OK);
    pump_all(&c2, &s);
    CHECK_CONTAINS(s.log, "reset:1 open:7 ");
    CHECK_EQ_INT(ymx_stream_count(s.s), 2);
    /* The server may not open one either. */
    CHECK_EQ_INT(ymx_open(s.s, &id), YMX_ELIMIT);
    peer_free(&c2);
  }
  peer_free(&c);
  peer_free(&s);
}

/* ------------------------------------------------- ping and go away */

static void test_ping(void) {
  static const uint8_t ping[] = {0, 2, 0, 1, 0, 0, 0, 0, 0xca, 0xfe, 0, 7};
  static const uint8_t pong[] = {0, 2, 0, 2, 0, 0, 0, 0, 0xca, 0xfe, 0, 7};
  peer c, s;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_ping(c.s, 0xcafe0007u), YMX_OK);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(c.s, &q, &len);
    CHECK(len == sizeof ping && memcmp(q, ping, len) == 0);
  }
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK(strcmp(s.log, "") == 0);
  {
    const uint8_t *q;
    size_t len;
    ymx_out_peek(s.s, &q, &len);
    CHECK(len == sizeof pong && memcmp(q, pong, len) == 0);
  }
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "pong:3405643783 ") == 0);
  CHECK_EQ_INT(ymx_out_pending(c.s), 0);
  peer_free(&c);
  peer_free(&s);
}

static void test_go_away(void) {
  static const uint8_t ga[] = {0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  peer c, s;
  uint32_t id;
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  pump_all(&c, &s);
  CHECK_EQ_INT(ymx_go_away(s.s, YMX_GOAWAY_NORMAL), YMX_OK);
  CHECK(out_is(s.s, ga, sizeof ga));
  CHECK_EQ_INT(ymx_open(s.s, &id), YMX_EGOAWAY);
  CHECK_EQ_INT(ymx_go_away(s.s, YMX_GOAWAY_NORMAL), YMX_OK);
  CHECK_EQ_INT(ymx_remote_go_away(c.s), 0);
  log_clear(&c);
  CHECK_EQ_INT(pump(&s, &c), YMX_OK);
  CHECK(strcmp(c.log, "goaway:0 ") == 0);
  CHECK_EQ_INT(ymx_remote_go_away(c.s), 1);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_EGOAWAY);
  /* Existing streams go on. */
  CHECK_EQ_INT(ymx_write(c.s, 1, (const uint8_t *)"ok", 2), 2);
  log_clear(&s);
  pump_all(&c, &s);
  CHECK(strcmp(s.log, "data:1:2 ") == 0);
  /* A SYN after our GO_AWAY is refused with RST, as Go does. */
  {
    uint8_t in[YMX_HEADER_SIZE];
    static const uint8_t rst3[] = {0, 1, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0};
    frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 3, 0);
    CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
    CHECK(out_is(s.s, rst3, sizeof rst3));
    CHECK(strcmp(s.log, "data:1:2 ") == 0);
  }
  /* The other way, with a code. */
  CHECK_EQ_INT(ymx_go_away(c.s, YMX_GOAWAY_INTERNAL), YMX_OK);
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  CHECK_CONTAINS(s.log, "goaway:2 ");
  CHECK_EQ_INT(ymx_remote_go_away(s.s), 1);
  peer_free(&c);
  peer_free(&s);
}

/* ------------------------------------------------- protocol errors */

/* Feeds `in` to a fresh session (a server unless is_client) after `pre`;
 * expects YMX_EPROTO, a single GO_AWAY(1) at the end of the output, and
 * YMX_EPROTO forever after. */
static void expect_proto(const char *what, int is_client, const uint8_t *pre,
                         size_t npre, const uint8_t *in, size_t n) {
  static const uint8_t ga1[] = {0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  peer p;
  const uint8_t *q;
  size_t len;
  int rc, before = check_failures;
  uint32_t id;
  peer_init(&p, is_client, 0);
  if (npre) CHECK_EQ_INT(ymx_feed(p.s, pre, npre), YMX_OK);
  rc = ymx_feed(p.s, in, n);
  CHECK_EQ_INT(rc, YMX_EPROTO);
  ymx_out_peek(p.s, &q, &len);
  CHECK(len >= YMX_HEADER_SIZE &&
        memcmp(q + len - YMX_HEADER_SIZE, ga1, YMX_HEADER_SIZE) == 0);
  CHECK_EQ_INT(ymx_feed(p.s, in, n), YMX_EPROTO);
  CHECK_EQ_INT(ymx_feed(p.s, NULL, 0), YMX_EPROTO);
  /* Nothing more is queued: the GO_AWAY stays last, and once. */
  CHECK_EQ_INT(ymx_ping(p.s, 1), YMX_EPROTO);
  CHECK_EQ_INT(ymx_open(p.s, &id), YMX_EPROTO);
  CHECK_EQ_INT(ymx_out_pending(p.s), len);
  {
    size_t i, gas = 0;
    for (i = 0; i + YMX_HEADER_SIZE <= len; i += YMX_HEADER_SIZE)
      gas += memcmp(q + i, ga1, YMX_HEADER_SIZE) == 0;
    CHECK_EQ_INT(gas, 1);
  }
  if (check_failures != before) fprintf(stderr, "  (case: %s)\n", what);
  peer_free(&p);
}

static void test_protocol_errors(void) {
  uint8_t pre[256], in[256];
  size_t np, n;
  /* Version 1. */
  n = frame(in, YMX_PING, YMX_SYN, 0, 0);
  in[0] = 1;
  expect_proto("version", 0, NULL, 0, in, n);
  /* Type 4. */
  n = frame(in, 4, 0, 0, 0);
  expect_proto("type 4", 0, NULL, 0, in, n);
  n = frame(in, 0xff, 0, 1, 0);
  expect_proto("type 255", 1, NULL, 0, in, n);
  /* SYN of the wrong parity: a server gets an even id, a client odd. */
  n = frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 2, 0);
  expect_proto("server gets even SYN", 0, NULL, 0, in, n);
  n = frame(in, YMX_DATA, YMX_SYN, 3, 0);
  expect_proto("client gets odd SYN", 1, NULL, 0, in, n);
  /* SYN on id 0. */
  n = frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 0, 0);
  expect_proto("SYN id 0", 0, NULL, 0, in, n);
  n = frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 0, 0);
  expect_proto("SYN id 0 (client)", 1, NULL, 0, in, n);
  /* Duplicate SYN. */
  np = frame(pre, YMX_WINDOW_UPDATE, YMX_SYN, 5, 0);
  n = frame(in, YMX_DATA, YMX_SYN, 5, 0);
  expect_proto("duplicate SYN", 0, pre, np, in, n);
  /* PING and GO_AWAY on a stream id. */
  n = frame(in, YMX_PING, YMX_SYN, 1, 0);
  expect_proto("PING id 1", 0, NULL, 0, in, n);
  n = frame(in, YMX_PING, YMX_ACK, 2, 0);
  expect_proto("PING ACK id 2", 1, NULL, 0, in, n);
  n = frame(in, YMX_GO_AWAY, 0, 1, 0);
  expect_proto("GO_AWAY id 1", 0, NULL, 0, in, n);
  /* DATA beyond the receive window: 256 KiB + 1 in one frame (only the
   * header is needed), or in two frames. */
  np = frame(pre, YMX_WINDOW_UPDATE, YMX_SYN, 1, 0);
  n = frame(in, YMX_DATA, 0, 1, YMX_INITIAL_WINDOW + 1);
  expect_proto("DATA > window", 0, pre, np, in, n);
  n = frame(in, YMX_DATA, YMX_SYN, 1, YMX_INITIAL_WINDOW + 1);
  expect_proto("SYN DATA > window", 0, NULL, 0, in, n);
  {
    size_t big = YMX_INITIAL_WINDOW + 64;
    uint8_t *pre2 = calloc(1, big);
    size_t off = frame(pre2, YMX_DATA, YMX_SYN, 1, YMX_INITIAL_WINDOW - 1);
    off += YMX_INITIAL_WINDOW - 1;
    n = frame(in, YMX_DATA, 0, 1, 2);
    expect_proto("DATA over two frames > window", 0, pre2, off, in, n);
    free(pre2);
  }
  /* DATA after the peer's FIN. */
  np = frame(pre, YMX_WINDOW_UPDATE, YMX_SYN, 1, 0);
  np += frame(pre + np, YMX_WINDOW_UPDATE, YMX_FIN, 1, 0);
  n = frame(in, YMX_DATA, 0, 1, 1);
  in[n++] = 'x';
  expect_proto("DATA after FIN", 0, pre, np, in, n);
  /* A second FIN. */
  n = frame(in, YMX_DATA, YMX_FIN, 1, 0);
  expect_proto("second FIN", 0, pre, np, in, n);
  /* A good frame first, the error inside one feed. */
  n = frame(in, YMX_PING, YMX_SYN, 0, 5);
  n += frame(in + n, YMX_WINDOW_UPDATE, YMX_SYN, 4, 0);
  expect_proto("after a good frame", 0, NULL, 0, in, n);
}

/* What is no error. */
static void test_not_errors(void) {
  peer p;
  uint8_t in[256];
  size_t n = 0;
  peer_init(&p, 0, 0);
  /* DATA for an unknown stream, its payload skipped; a frame on id 0
   * without SYN; a window update and FIN for unknown streams; then a
   * PING that must still parse. */
  n += frame(in + n, YMX_DATA, 0, 9, 5);
  memcpy(in + n, "\x00\x02\x00\x01\x00", 5); /* looks like a header */
  n += 5;
  n += frame(in + n, YMX_WINDOW_UPDATE, 0, 0, 100);
  n += frame(in + n, YMX_WINDOW_UPDATE, YMX_FIN, 11, 1);
  n += frame(in + n, YMX_DATA, YMX_RST, 13, 0);
  n += frame(in + n, YMX_PING, YMX_SYN, 0, 77);
  /* A PING without flags and a GO_AWAY with flags are harmless. */
  n += frame(in + n, YMX_PING, 0, 0, 1);
  n += frame(in + n, YMX_GO_AWAY, YMX_SYN, 0, 5);
  CHECK_EQ_INT(ymx_feed(p.s, in, n), YMX_OK);
  CHECK(strcmp(p.log, "goaway:5 ") == 0);
  {
    uint8_t want[YMX_HEADER_SIZE];
    frame(want, YMX_PING, YMX_ACK, 0, 77);
    CHECK(out_is(p.s, want, sizeof want));
  }
  CHECK_EQ_INT(ymx_stream_count(p.s), 0);
  /* Zero-length DATA after FIN (no data in it) and a window update after
   * FIN are fine. */
  n = frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 1, 0);
  n += frame(in + n, YMX_WINDOW_UPDATE, YMX_FIN, 1, 0);
  n += frame(in + n, YMX_DATA, 0, 1, 0);
  n += frame(in + n, YMX_WINDOW_UPDATE, 0, 1, 10);
  log_clear(&p);
  CHECK_EQ_INT(ymx_feed(p.s, in, n), YMX_OK);
  CHECK(strcmp(p.log, "open:1 fin:1 window:1 ") == 0);
  CHECK_EQ_INT(ymx_send_window(p.s, 1), YMX_INITIAL_WINDOW + 10);
  /* The send window saturates at 2^32-1. */
  n = frame(in, YMX_WINDOW_UPDATE, 0, 1, 0xffffffffu);
  CHECK_EQ_INT(ymx_feed(p.s, in, n), YMX_OK);
  CHECK_EQ_INT(ymx_send_window(p.s, 1), 0xffffffffu);
  /* Exactly the window in one DATA frame is allowed. */
  {
    size_t big = YMX_INITIAL_WINDOW + YMX_HEADER_SIZE;
    uint8_t *b = calloc(1, big);
    frame(b, YMX_DATA, YMX_SYN, 3, YMX_INITIAL_WINDOW);
    CHECK_EQ_INT(ymx_feed(p.s, b, big), YMX_OK);
    CHECK_EQ_INT(ymx_recv_buffered(p.s, 3), YMX_INITIAL_WINDOW);
    free(b);
  }
  peer_free(&p);
}

/* ----------------------------------------------- re-entrant callbacks */

static void test_reset_inside_on_data(void) {
  peer s;
  uint8_t in[256];
  size_t n;
  uint8_t want[2 * YMX_HEADER_SIZE];
  peer_init(&s, 0, 0);
  s.reset_in_data = 1;
  n = frame(in, YMX_DATA, YMX_SYN | YMX_FIN, 1, 10);
  memcpy(in + n, "0123456789", 10);
  n += 10;
  n += frame(in + n, YMX_PING, YMX_SYN, 0, 3);
  /* The first 4 payload bytes, then the rest with the PING. */
  CHECK_EQ_INT(ymx_feed(s.s, in, YMX_HEADER_SIZE + 4), YMX_OK);
  CHECK(strcmp(s.log, "open:1 data:1:4 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  CHECK_EQ_INT(ymx_feed(s.s, in + YMX_HEADER_SIZE + 4, n - YMX_HEADER_SIZE - 4),
               YMX_OK);
  /* The rest was skipped, the FIN ignored, the PING answered. */
  CHECK(strcmp(s.log, "open:1 data:1:4 ") == 0);
  frame(want, YMX_WINDOW_UPDATE, YMX_ACK, 1, 0);
  frame(want + YMX_HEADER_SIZE, YMX_WINDOW_UPDATE, YMX_RST, 1, 0);
  {
    uint8_t all[3 * YMX_HEADER_SIZE];
    memcpy(all, want, sizeof want);
    frame(all + sizeof want, YMX_PING, YMX_ACK, 0, 3);
    CHECK(out_is(s.s, all, sizeof all));
  }
  peer_free(&s);
}

static void test_callbacks_in_open(void) {
  peer s;
  uint8_t in[64], want[64];
  size_t n, w;
  /* on_open writes: that DATA carries the ACK, no separate update. */
  peer_init(&s, 0, 0);
  s.write_in_open = 1;
  n = frame(in, YMX_WINDOW_UPDATE, YMX_SYN, 1, 0);
  CHECK_EQ_INT(ymx_feed(s.s, in, n), YMX_OK);
  w = frame(want, YMX_DATA, YMX_ACK, 1, 2);
  memcpy(want + w, "hi", 2);
  CHECK(out_is(s.s, want, w + 2));
  CHECK_EQ_INT(ymx_send_window(s.s, 1), YMX_INITIAL_WINDOW - 2);
  peer_free(&s);
  /* on_open resets it: the RST goes out, no ACK, the payload skipped. */
  peer_init(&s, 0, 0);
  s.reset_in_open = 1;
  n = frame(in, YMX_DATA, YMX_SYN, 1, 3);
  memcpy(in + n, "abc", 3);
  n += 3;
  n += frame(in + n, YMX_PING, YMX_SYN, 0, 1);
  CHECK_EQ_INT(ymx_feed(s.s, in, n), YMX_OK);
  CHECK(strcmp(s.log, "open:1 ") == 0);
  w = frame(want, YMX_WINDOW_UPDATE, YMX_RST, 1, 0);
  w += frame(want + w, YMX_PING, YMX_ACK, 0, 1);
  CHECK(out_is(s.s, want, w));
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  peer_free(&s);
}

/* on_ack resets the stream: the rest of that frame (payload, FIN) is
 * skipped, the next frame parses. */
static void test_reset_inside_on_ack(void) {
  peer c;
  uint32_t id;
  uint8_t in[64], want[YMX_HEADER_SIZE];
  size_t n;
  peer_init(&c, 1, 0);
  c.reset_in_ack = 1;
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  ymx_out_drop(c.s, ymx_out_pending(c.s));
  n = frame(in, YMX_DATA, YMX_ACK | YMX_FIN, id, 4);
  memcpy(in + n, "gone", 4);
  n += 4;
  n += frame(in + n, YMX_PING, YMX_ACK, 0, 8);
  CHECK_EQ_INT(ymx_feed(c.s, in, n), YMX_OK);
  CHECK(strcmp(c.log, "ack:1 pong:8 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  frame(want, YMX_WINDOW_UPDATE, YMX_RST, 1, 0);
  CHECK(out_is(c.s, want, sizeof want));
  peer_free(&c);
}

/* A callback consuming at once sends the window update from inside
 * ymx_feed; a nested ymx_feed is refused. */
static void test_consume_and_feed_inside_on_data(void) {
  peer c, s;
  uint32_t id;
  uint8_t *buf = malloc(512 * KIB);
  size_t i;
  for (i = 0; i < 512 * KIB; i++) buf[i] = pattern(i);
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  s.consume_in_data = 1;
  s.feed_in_data = 1;
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_write(c.s, id, buf, 512 * KIB), 256 * KIB);
  pump_all(&c, &s);
  CHECK_EQ_INT(s.nested_feed_rc, YMX_EINVAL);
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 0);
  /* Both 128 KiB updates arrived: the window is whole again. */
  CHECK_EQ_INT(ymx_send_window(c.s, 1), 256 * KIB);
  CHECK_EQ_INT(ymx_write(c.s, id, buf + 256 * KIB, 256 * KIB), 256 * KIB);
  pump_all(&c, &s);
  CHECK_EQ_INT(s.rx_len, 512 * KIB);
  CHECK(s.rx_len == 512 * KIB && memcmp(s.rx, buf, 512 * KIB) == 0);
  peer_free(&c);
  peer_free(&s);
  free(buf);
}

/* A FIN carries the consumption not yet announced. */
static void test_fin_carries_update(void) {
  peer c, s;
  uint32_t id;
  uint8_t buf[1000] = {0}, want[YMX_HEADER_SIZE];
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_write(c.s, id, buf, sizeof buf), 1000);
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  ymx_out_drop(s.s, ymx_out_pending(s.s)); /* the ACK */
  CHECK_EQ_INT(ymx_consumed(s.s, 1, 600), YMX_OK);
  CHECK_EQ_INT(ymx_out_pending(s.s), 0);
  CHECK_EQ_INT(ymx_close(s.s, 1), YMX_OK);
  frame(want, YMX_WINDOW_UPDATE, YMX_FIN, 1, 600);
  CHECK(out_is(s.s, want, sizeof want));
  CHECK_EQ_INT(ymx_recv_buffered(s.s, 1), 400);
  peer_free(&c);
  peer_free(&s);
}

/* ------------------------------------------- exact bytes of Go yamux */

/* What a Go client (hashicorp/yamux, as go-plugin uses it) puts on the
 * wire, from its source: OpenStream -> sendWindowUpdate with SYN, delta 0
 * (stream.go: delta = (max - bufLen) - recvWindow = 0); Write -> DATA with
 * no flags (state SYNSent already); Ping -> PING SYN with pingID from 0;
 * Close -> sendClose: WINDOW_UPDATE with FIN, length 0; Read of 128 KiB
 * -> WINDOW_UPDATE flags 0, delta 131072; GoAway -> GO_AWAY 0. */
static void test_go_client_bytes(void) {
  /* clang-format off */
  static const uint8_t go[] = {
      0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, /* WU SYN 1 */
      0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, /* DATA 1 len 5 */
      'h', 'e', 'l', 'l', 'o',
      0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, /* PING SYN 0 */
      0, 1, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, /* WU SYN 3 */
      0, 1, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0, /* WU FIN 1 */
      0, 1, 0, 0, 0, 0, 0, 3, 0, 2, 0, 0, /* WU 3 +131072 */
      0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* GO_AWAY 0 */
  };
  /* clang-format on */
  /* And what Go's server sends back for it (AcceptStream: WU ACK delta 0;
   * the ping reply: PING ACK with the same id). */
  static const uint8_t ours[] = {
      0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, /* WU ACK 1 */
      0, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, /* PING ACK 0 */
      0, 1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, /* WU ACK 3 */
  };
  peer s;
  peer_init(&s, 0, 0);
  CHECK_EQ_INT(ymx_feed(s.s, go, sizeof go), YMX_OK);
  CHECK(strcmp(s.log, "open:1 data:1:5 open:3 fin:1 window:3 goaway:0 ") == 0);
  CHECK(s.rx_len == 5 && memcmp(s.rx, "hello", 5) == 0);
  CHECK(out_is(s.s, ours, sizeof ours));
  CHECK_EQ_INT(ymx_send_window(s.s, 3), YMX_INITIAL_WINDOW + 128 * KIB);
  CHECK_EQ_INT(ymx_remote_go_away(s.s), 1);
  peer_free(&s);
}

/* A Go server's replies to our client: ACK, DATA with no flags, its own
 * stream (even id, WU SYN), RST of a refused stream. */
static void test_go_server_bytes(void) {
  static const uint8_t go[] = {
      0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0,           /* WU ACK 1 */
      0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 'o', 'k', /* DATA 1 "ok" */
      0, 1, 0, 8, 0, 0, 0, 3, 0, 0, 0, 0,           /* WU RST 3 */
      0, 1, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0,           /* WU SYN 2 */
  };
  peer c;
  uint32_t id;
  peer_init(&c, 1, 0);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  ymx_out_drop(c.s, ymx_out_pending(c.s));
  CHECK_EQ_INT(ymx_feed(c.s, go, sizeof go), YMX_OK);
  CHECK(strcmp(c.log, "ack:1 data:1:2 reset:3 open:2 ") == 0);
  CHECK_EQ_INT(ymx_stream_count(c.s), 2);
  {
    uint8_t want[YMX_HEADER_SIZE];
    frame(want, YMX_WINDOW_UPDATE, YMX_ACK, 2, 0);
    CHECK(out_is(c.s, want, sizeof want));
  }
  peer_free(&c);
}

/* ------------------------------------------------- table and queue */

/* Many streams: the table grows and deletes (backward shift) correctly. */
static void test_many_streams(void) {
  peer c;
  uint32_t id, i;
  int ok = 1;
  peer_init(&c, 1, 3000);
  for (i = 0; i < 3000; i++) {
    if (ymx_open(c.s, &id) != YMX_OK || id != 2 * i + 1) ok = 0;
  }
  CHECK(ok);
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_ELIMIT);
  CHECK_EQ_INT(ymx_stream_count(c.s), 3000);
  for (i = 0; i < 3000; i += 3) ymx_reset(c.s, 2 * i + 1);
  CHECK_EQ_INT(ymx_stream_count(c.s), 2000);
  for (i = 0; i < 3000; i++) {
    uint32_t w = ymx_send_window(c.s, 2 * i + 1);
    if (w != (i % 3 == 0 ? 0 : YMX_INITIAL_WINDOW)) ok = 0;
  }
  CHECK(ok);
  for (i = 0; i < 3000; i++) ymx_reset(c.s, 2 * i + 1);
  CHECK_EQ_INT(ymx_stream_count(c.s), 0);
  /* The output: a peek returns it all at once; partial drops walk it. */
  {
    const uint8_t *q;
    size_t len, total = ymx_out_pending(c.s);
    CHECK_EQ_INT(total, 6000 * YMX_HEADER_SIZE); /* 3000 SYN, 3000 RST */
    ymx_out_peek(c.s, &q, &len);
    CHECK_EQ_INT(len, total);
    ymx_out_drop(c.s, 5);
    CHECK_EQ_INT(ymx_out_pending(c.s), total - 5);
    ymx_out_drop(c.s, total);
    CHECK_EQ_INT(ymx_out_pending(c.s), 0);
    ymx_out_peek(c.s, &q, &len);
    CHECK_EQ_INT(len, 0);
  }
  peer_free(&c);
}

/* Peer ids in any order collide in the table: removals in the middle of
 * probe runs must keep every other stream reachable. */
static void test_table_random_ids(void) {
  enum { N = 4000 };
  static uint32_t ids[N];
  peer s;
  uint32_t x = 12345;
  size_t i, j, bad = 0;
  uint8_t in[YMX_HEADER_SIZE];
  peer_init(&s, 0, N);
  for (i = 0; i < N; i++) {
    int dup;
    do { /* distinct odd ids (a client's), from an LCG */
      x = x * 1664525u + 1013904223u;
      ids[i] = (x >> 4) | 1u;
      dup = 0;
      for (j = 0; j < i; j++) dup |= ids[j] == ids[i];
    } while (dup);
    frame(in, YMX_WINDOW_UPDATE, YMX_SYN, ids[i], (uint32_t)i);
    CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
  }
  CHECK_EQ_INT(ymx_stream_count(s.s), N);
  for (i = 0; i < N; i += 2) {
    frame(in, YMX_WINDOW_UPDATE, YMX_RST, ids[i], 0);
    CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
  }
  CHECK_EQ_INT(ymx_stream_count(s.s), N / 2);
  for (i = 0; i < N; i++) {
    uint32_t want = i % 2 ? YMX_INITIAL_WINDOW + (uint32_t)i : 0;
    bad += ymx_send_window(s.s, ids[i]) != want;
  }
  CHECK_EQ_INT(bad, 0);
  for (i = 1; i < N; i += 2) CHECK_EQ_INT(ymx_reset(s.s, ids[i]), YMX_OK);
  CHECK_EQ_INT(ymx_stream_count(s.s), 0);
  peer_free(&s);
}

/* White box: a probe run that wraps past the table's end (the table
 * starts with 16 slots, a stream's home slot is the top 4 bits of
 * id * 0x9E3779B1).  A at home 15, D at home 0 lands in slot 0; removing
 * A must leave D where it is. */
static void test_table_wraparound(void) {
  peer s;
  uint32_t a = 0, d = 0, id;
  uint8_t in[YMX_HEADER_SIZE];
  for (id = 1; !a || !d; id += 2) {
    uint32_t home = (uint32_t)(id * 0x9E3779B1u) >> 28;
    if (home == 15 && !a) a = id;
    if (home == 0 && !d) d = id;
  }
  peer_init(&s, 0, 0);
  frame(in, YMX_WINDOW_UPDATE, YMX_SYN, a, 0);
  CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
  frame(in, YMX_WINDOW_UPDATE, YMX_SYN, d, 5);
  CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
  frame(in, YMX_WINDOW_UPDATE, YMX_SYN, a + 32, 0); /* one more stream */
  CHECK_EQ_INT(ymx_feed(s.s, in, sizeof in), YMX_OK);
  CHECK_EQ_INT(ymx_reset(s.s, a), YMX_OK);
  CHECK_EQ_INT(ymx_send_window(s.s, d), YMX_INITIAL_WINDOW + 5);
  CHECK_EQ_INT(ymx_send_window(s.s, a + 32), YMX_INITIAL_WINDOW);
  CHECK_EQ_INT(ymx_send_window(s.s, a), 0);
  peer_free(&s);
}

/* Writing and draining in a loop: the queue compacts (a partial drop then
 * more writes must keep the order). */
static void test_queue_order(void) {
  peer c, s;
  uint32_t id;
  uint8_t buf[3000];
  size_t i, k;
  for (i = 0; i < sizeof buf; i++) buf[i] = pattern(i);
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  s.consume_in_data = 1;
  CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
  for (k = 0; k < 400; k++) {
    const uint8_t *q;
    size_t len;
    CHECK_EQ_INT(ymx_write(c.s, id, buf + k % 7, 1000 + k % 13),
                 (long)(1000 + k % 13));
    ymx_out_peek(c.s, &q, &len);
    /* Feed and drop only part of it; the rest goes out with the next. */
    CHECK_EQ_INT(ymx_feed(s.s, q, len / 2 + 1), YMX_OK);
    ymx_out_drop(c.s, len / 2 + 1);
    CHECK_EQ_INT(pump(&s, &c), YMX_OK); /* the window updates */
  }
  CHECK_EQ_INT(pump(&c, &s), YMX_OK);
  {
    size_t off = 0, bad = 0;
    for (k = 0; k < 400; k++) {
      size_t n = 1000 + k % 13;
      if (off + n > s.rx_len || memcmp(s.rx + off, buf + k % 7, n) != 0) bad++;
      off += n;
    }
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(off, s.rx_len);
  }
  peer_free(&c);
  peer_free(&s);
}

/* 2 MiB queued at once, then drained 100000 bytes at a time: the
 * buffer is compacted and shrunk on the way (ymx_out_drop) and every
 * byte still arrives in order. */
static void test_queue_shrink(void) {
  enum { NS = 8 };
  const size_t win = YMX_INITIAL_WINDOW;
  uint8_t *src = malloc(win);
  peer c, s;
  uint32_t id;
  size_t i, bad = 0;
  for (i = 0; i < win; i++) src[i] = pattern(i + 3);
  peer_init(&c, 1, 0);
  peer_init(&s, 0, 0);
  for (i = 0; i < NS; i++) {
    CHECK_EQ_INT(ymx_open(c.s, &id), YMX_OK);
    CHECK_EQ_INT(ymx_write(c.s, id, src, win), (long)win);
  }
  CHECK(ymx_out_pending(c.s) > NS * win);
  CHECK_EQ_INT(pump_step(&c, &s, 100000), YMX_OK);
  CHECK_EQ_INT(ymx_out_pending(c.s), 0);
  CHECK_EQ_INT(s.rx_len, NS * win);
  for (i = 0; i < NS && s.rx_len == NS * win; i++)
    bad += memcmp(s.rx + i * win, src, win) != 0;
  CHECK_EQ_INT(bad, 0);
  /* And again after the shrink: the queue still works. */
  CHECK_EQ_INT(ymx_ping(c.s, 5), YMX_OK);
  log_clear(&c);
  pump_all(&c, &s);
  CHECK_CONTAINS(c.log, "pong:5 ");
  peer_free(&c);
  peer_free(&s);
  free(src);
}

int main(void) {
  test_header_codec();
  test_open_ids_and_bytes();
  test_syn_ack_and_data();
  test_flow_control();
  test_byte_at_a_time();
  test_fin_both_ways();
  test_close_inside_on_fin();
  test_rst_both_ways();
  test_refuse_and_limits();
  test_ping();
  test_go_away();
  test_protocol_errors();
  test_not_errors();
  test_reset_inside_on_data();
  test_callbacks_in_open();
  test_reset_inside_on_ack();
  test_consume_and_feed_inside_on_data();
  test_fin_carries_update();
  test_go_client_bytes();
  test_go_server_bytes();
  test_many_streams();
  test_table_random_ids();
  test_table_wraparound();
  test_queue_order();
  test_queue_shrink();
  return check_report("test_yamux");
}
