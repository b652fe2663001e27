/* libFuzzer: the yamux state machine (host-api/yamux.c).  The input is a
 * program.  Its first byte picks the mode, the limits and what the
 * callbacks do to the session while it feeds them (refuse, reset, consume,
 * close, write, open); then operations follow:
 *   - raw mode: one session fed raw input bytes (split anywhere) and
 *     frames built from a few input bytes (any type, flags, id, length,
 *     aimed at live streams or at the next id), plus application calls;
 *   - pair mode: a client and a server wired together, application calls
 *     on either side and transfers of some of one's output to the other,
 *     optionally with a byte flipped on the way.
 * A model of every stream is kept from the callbacks and the calls, and
 * checked against the session after each step: the same set of streams,
 * the same buffered counts, never more than the window buffered, never
 * more streams than max_streams, exact send-window arithmetic, and
 * ymx_consumed beyond the buffered bytes refused.  Every byte the session
 * outputs is walked as frames: each must be well formed, and after
 * YMX_EPROTO the output must end with one GO_AWAY(1) and grow no more.
 * In pair mode without a flipped byte no side may see a protocol error
 * and every payload byte must arrive as written.  Violations trap. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "yamux.h"

#define CHECK(c)                \
  do {                          \
    if (!(c)) __builtin_trap(); \
  } while (0)

#define MAXREC 1100 /* > the largest max_streams used (1024) */
#define PAT_PERIOD 65521u
#define MAX_WRITE (300u * 1024u)
#define KIB 1024u

/* Payload of stream id at offset off: pattern + ((off + id * 131) % P). */
static uint8_t pattern[PAT_PERIOD + MAX_WRITE];

static const uint8_t *pat_at(uint32_t id, uint64_t off) {
  return pattern + (off + (uint64_t)id * 131u) % PAT_PERIOD;
}

typedef struct rec {
  uint32_t id;
  uint64_t sent, recvd;
  uint32_t buffered;
  int local_fin, remote_fin, acked;
} rec;

/* Walks output bytes as frames, across any split. */
typedef struct walker {
  uint8_t hdr[YMX_HEADER_SIZE];
  size_t have;
  uint32_t pay_left;
  ymx_header last;
  int any;
} walker;

typedef struct side {
  ymx_session *s;
  int is_client, dead, mutated_in;
  uint32_t max_streams;
  rec recs[MAXREC];
  size_t nrec;
  walker w;              /* over what was dropped from the output */
  uint64_t dropped;      /* bytes dropped from the output */
  uint64_t dead_total;   /* dropped + pending when it died: no growth */
  uint32_t next_peer_id; /* raw mode: ids for SYN frames */
  struct world *world;
} side;

typedef struct world {
  side sides[2];
  int pair, mutated;
  /* what the callbacks do */
  int refuse, reset_in_data, consume_in_data, close_in_fin, write_in_open,
      open_in_data;
  int depth;
} world;

/* ------------------------------------------------------------ walker */

static void walk_frame(const side *sd, const ymx_header *h) {
  CHECK(ymx_header_check(h) == 0);
  switch (h->type) {
    case YMX_DATA:
      CHECK(h->stream_id != 0);
      CHECK(h->length > 0 && h->length <= 64 * KIB);
      CHECK((h->flags & ~YMX_ACK) == 0); /* SYN goes on a window update */
      break;
    case YMX_WINDOW_UPDATE:
      CHECK(h->stream_id != 0);
      CHECK((h->flags & ~(YMX_SYN | YMX_ACK | YMX_FIN | YMX_RST)) == 0);
      /* Our SYNs use our parity. */
      if (h->flags & YMX_SYN)
        CHECK((h->stream_id & 1u) == (sd->is_client ? 1u : 0u));
      /* The peer's view of our window never exceeds the initial one. */
      CHECK(h->length <= YMX_INITIAL_WINDOW);
      break;
    case YMX_PING:
      CHECK(h->stream_id == 0);
      CHECK(h->flags == YMX_SYN || h->flags == YMX_ACK);
      break;
    default:
      CHECK(h->stream_id == 0 && h->flags == 0);
      break;
  }
}

static void walk(const side *sd, walker *w, const uint8_t *p, size_t n) {
  while (n > 0) {
    if (w->pay_left) {
      size_t k = n < w->pay_left ? n : w->pay_left;
      w->pay_left -= (uint32_t)k;
      p += k;
      n -= k;
      continue;
    }
    {
      size_t k = YMX_HEADER_SIZE - w->have;
      if (k > n) k = n;
      memcpy(w->hdr + w->have, p, k);
      w->have += k;
      p += k;
      n -= k;
    }
    if (w->have == YMX_HEADER_SIZE) {
      w->have = 0;
      ymx_header_decode(w->hdr, &w->last);
      w->any = 1;
      walk_frame(sd, &w->last);
      if (w->last.type == YMX_DATA) w->pay_left = w->last.length;
    }
  }
}

/* Everything pending must complete whole frames; after a protocol error
 * the last one is GO_AWAY(1) and nothing was added since. */
static void check_output(side *sd) {
  const uint8_t *p;
  size_t len;
  walker w = sd->w;
  ymx_out_peek(sd->s, &p, &len);
  CHECK(len == ymx_out_pending(sd->s));
  CHECK((len == 0) == (p == NULL));
  walk(sd, &w, p, len);
  CHECK(w.have == 0 && w.pay_left == 0);
  if (sd->dead == YMX_EPROTO) {
    CHECK(w.any && w.last.type == YMX_GO_AWAY &&
          w.last.length == YMX_GOAWAY_PROTO);
    CHECK(sd->dropped + len == sd->dead_total);
  }
}

static void drop(side *sd, size_t n) {
  const uint8_t *p;
  size_t len;
  ymx_out_peek(sd->s, &p, &len);
  if (n > len) n = len;
  walk(sd, &sd->w, p, n);
  ymx_out_drop(sd->s, n);
  sd->dropped += n;
}

/* ------------------------------------------------------------ model */

static rec *find(side *sd, uint32_t id) {
  size_t i;
  for (i = 0; i < sd->nrec; i++)
    if (sd->recs[i].id == id) return &sd->recs[i];
  return NULL;
}

static rec *add(side *sd, uint32_t id) {
  rec *r;
  CHECK(!find(sd, id));
  CHECK(sd->nrec < MAXREC);
  r = &sd->recs[sd->nrec++];
  memset(r, 0, sizeof *r);
  r->id = id;
  return r;
}

static void del(side *sd, uint32_t id) {
  rec *r = find(sd, id);
  CHECK(r != NULL);
  *r = sd->recs[--sd->nrec];
}

static int own_id(const side *sd, uint32_t id) {
  return (id & 1u) == (sd->is_client ? 1u : 0u);
}

/* ------------------------------------------- application, checked */

static void h_open(side *sd);
static void h_close(side *sd, uint32_t id);
static void h_reset(side *sd, uint32_t id);
static void h_consume(side *sd, uint32_t id, size_t n);
static void h_write(side *sd, uint32_t id, size_t n);

static void h_open(side *sd) {
  uint32_t id = 0;
  size_t count = ymx_stream_count(sd->s);
  int rc = ymx_open(sd->s, &id);
  if (sd->dead) {
    CHECK(rc == sd->dead);
    return;
  }
  if (rc == YMX_OK) {
    CHECK(count < sd->max_streams);
    CHECK(own_id(sd, id) && id != 0);
    add(sd, id);
  } else {
    CHECK(rc == YMX_EGOAWAY || rc == YMX_ELIMIT);
    if (rc == YMX_ELIMIT) CHECK(count >= sd->max_streams);
  }
}

static void h_write(side *sd, uint32_t id, size_t n) {
  rec *r = find(sd, id);
  uint32_t w0 = ymx_send_window(sd->s, id);
  long rc;
  if (n > MAX_WRITE) n = MAX_WRITE;
  rc = ymx_write(sd->s, id, pat_at(id, r ? r->sent : 0), n);
  if (sd->dead) {
    CHECK(rc == sd->dead);
    return;
  }
  if (!r) {
    CHECK(rc == YMX_ENOSTREAM && w0 == 0);
    return;
  }
  if (r->local_fin) {
    CHECK(rc == YMX_ECLOSED);
    return;
  }
  CHECK(rc == (long)(n < w0 ? n : w0));
  CHECK(ymx_send_window(sd->s, id) == w0 - (uint32_t)rc);
  r->sent += (uint64_t)rc;
}

static void h_consume(side *sd, uint32_t id, size_t n) {
  rec *r = find(sd, id);
  int rc;
  if (sd->dead) {
    CHECK(ymx_consumed(sd->s, id, n) == sd->dead);
    return;
  }
  if (!r) {
    CHECK(ymx_consumed(sd->s, id, n) == YMX_ENOSTREAM);
    return;
  }
  /* More than buffered: refused, nothing changes. */
  CHECK(ymx_consumed(sd->s, id, (size_t)r->buffered + 1 + n) == YMX_EINVAL);
  if (n > r->buffered) n = r->buffered;
  rc = ymx_consumed(sd->s, id, n);
  CHECK(rc == YMX_OK);
  r->buffered -= (uint32_t)n;
  CHECK(ymx_recv_buffered(sd->s, id) == r->buffered);
}

static void h_close(side *sd, uint32_t id) {
  rec *r = find(sd, id);
  int prev, rc;
  if (sd->dead) {
    CHECK(ymx_close(sd->s, id) == sd->dead);
    return;
  }
  if (!r) {
    CHECK(ymx_close(sd->s, id) == YMX_ENOSTREAM);
    return;
  }
  prev = r->local_fin;
  r->local_fin = 1; /* on_closed may come from inside ymx_close */
  rc = ymx_close(sd->s, id);
  if (prev) {
    CHECK(rc == YMX_ECLOSED);
  } else {
    CHECK(rc == YMX_OK);
  }
}

static void h_reset(side *sd, uint32_t id) {
  rec *r = find(sd, id);
  int rc = ymx_reset(sd->s, id);
  if (sd->dead) {
    CHECK(rc == sd->dead);
    return;
  }
  if (!r) {
    CHECK(rc == YMX_ENOSTREAM);
    return;
  }
  CHECK(rc == YMX_OK);
  del(sd, id);
}

/* ------------------------------------------------------- callbacks */

static int cb_open(void *ud, uint32_t id) {
  side *sd = ud;
  world *w = sd->world;
  rec *r;
  CHECK(!own_id(sd, id) && id != 0);
  CHECK(ymx_stream_count(sd->s) <= sd->max_streams);
  r = add(sd, id);
  (void)r;
  if (w->write_in_open) h_write(sd, id, 5);
  if (w->refuse && ((id * 0x9E3779B1u) >> 29) < (uint32_t)w->refuse) {
    del(sd, id);
    return 1;
  }
  if (w->reset_in_data && id % 5 == 0) {
    h_reset(sd, id);
  }
  return 0;
}

static void cb_data(void *ud, uint32_t id, const uint8_t *p, size_t n) {
  side *sd = ud;
  world *w = sd->world;
  rec *r = find(sd, id);
  CHECK(r != NULL);
  CHECK(n > 0);
  CHECK(!r->remote_fin);
  if (w->pair && !w->mutated) CHECK(memcmp(p, pat_at(id, r->recvd), n) == 0);
  r->recvd += n;
  r->buffered += (uint32_t)n;
  CHECK(r->buffered <= YMX_INITIAL_WINDOW);
  CHECK(ymx_recv_buffered(sd->s, id) == r->buffered);
  if (w->depth > 4) return;
  w->depth++;
  if (w->consume_in_data) h_consume(sd, id, n);
  if (w->open_in_data && r->recvd % 3 == 0) h_open(sd);
  if (w->reset_in_data && (find(sd, id) ? find(sd, id)->recvd : 0) % 7 == 3)
    h_reset(sd, id);
  w->depth--;
}

static void cb_fin(void *ud, uint32_t id) {
  side *sd = ud;
  rec *r = find(sd, id);
  CHECK(r != NULL && !r->remote_fin);
  r->remote_fin = 1;
  if (sd->world->close_in_fin && !r->local_fin) h_close(sd, id);
}

static void cb_reset(void *ud, uint32_t id) {
  side *sd = ud;
  CHECK(find(sd, id) != NULL);
  CHECK(ymx_consumed(sd->s, id, 0) == YMX_ENOSTREAM);
  del(sd, id);
}

static void cb_window(void *ud, uint32_t id) {
  side *sd = ud;
  CHECK(find(sd, id) != NULL);
  CHECK(ymx_send_window(sd->s, id) > 0);
}

static void cb_ack(void *ud, uint32_t id) {
  side *sd = ud;
  rec *r = find(sd, id);
  CHECK(r != NULL && own_id(sd, id) && !r->acked);
  r->acked = 1;
  if (sd->world->reset_in_data && id % 3 == 1) h_reset(sd, id);
}

static void cb_closed(void *ud, uint32_t id) {
  side *sd = ud;
  rec *r = find(sd, id);
  CHECK(r != NULL && r->local_fin && r->remote_fin);
  CHECK(ymx_consumed(sd->s, id, 0) == YMX_ENOSTREAM);
  del(sd, id);
}

static void cb_go_away(void *ud, uint32_t code) {
  side *sd = ud;
  uint32_t id;
  CHECK(ymx_remote_go_away(sd->s) == 1);
  CHECK(ymx_open(sd->s, &id) == YMX_EGOAWAY);
  (void)code;
}

static void cb_pong(void *ud, uint32_t opaque) {
  (void)ud, (void)opaque;
}

static const ymx_callbacks callbacks = {cb_open,   cb_data,    cb_fin,
                                        cb_reset,  cb_window,  cb_ack,
                                        cb_closed, cb_go_away, cb_pong};

/* ---------------------------------------------------------- checks */

static void check_side(side *sd) {
  size_t i;
  CHECK(ymx_stream_count(sd->s) <= sd->max_streams);
  CHECK(ymx_stream_count(sd->s) == sd->nrec);
  for (i = 0; i < sd->nrec; i++) {
    const rec *r = &sd->recs[i];
    CHECK(ymx_recv_buffered(sd->s, r->id) == r->buffered);
    CHECK(r->buffered <= YMX_INITIAL_WINDOW);
    CHECK(!(r->local_fin && r->remote_fin)); /* would be forgotten */
  }
  check_output(sd);
}

/* A feed through the model: EPROTO is sticky and leaves GO_AWAY(1). */
static void h_feed(side *sd, const uint8_t *p, size_t n) {
  int rc = ymx_feed(sd->s, p, n);
  if (sd->dead) {
    CHECK(rc == sd->dead);
    return;
  }
  CHECK(rc == YMX_OK || rc == YMX_EPROTO);
  if (rc == YMX_EPROTO) {
    const uint8_t *q;
    size_t len;
    sd->dead = rc;
    ymx_out_peek(sd->s, &q, &len);
    sd->dead_total = sd->dropped + len;
    CHECK(ymx_feed(sd->s, p, n) == YMX_EPROTO);
    CHECK(ymx_feed(sd->s, NULL, 0) == YMX_EPROTO);
  }
}

/* --------------------------------------------------- input reading */

typedef struct input {
  const uint8_t *p;
  size_t n;
} input;

static uint8_t byte(input *in) {
  uint8_t b;
  if (in->n == 0) return 0;
  b = *in->p++;
  in->n--;
  return b;
}

static uint32_t u32(input *in) {
  uint32_t v = byte(in);
  v = v << 8 | byte(in);
  v = v << 8 | byte(in);
  return v << 8 | byte(in);
}

/* A stream to act on: mostly a live one, sometimes any id. */
static uint32_t pick_id(side *sd, uint8_t b) {
  if (sd->nrec > 0 && b < 224) return sd->recs[b % sd->nrec].id;
  return (uint32_t)(b & 15);
}

static size_t pick_size(uint8_t b) {
  static const size_t special[] = {
      0,         1,         64 * KIB,      64 * KIB + 1,
      128 * KIB, 256 * KIB, 256 * KIB + 1, MAX_WRITE};
  if (b < 200) return (size_t)b * 37u;
  return special[b % 8];
}

/* An application call on sd (ops 0..7). */
static void app_op(side *sd, uint8_t op, input *in) {
  switch (op & 7) {
    case 0:
      h_open(sd);
      break;
    case 1: {
      uint8_t a = byte(in);
      h_write(sd, pick_id(sd, a), pick_size(byte(in)));
      break;
    }
    case 2: {
      uint8_t a = byte(in);
      h_consume(sd, pick_id(sd, a), pick_size(byte(in)));
      break;
    }
    case 3:
      h_close(sd, pick_id(sd, byte(in)));
      break;
    case 4:
      h_reset(sd, pick_id(sd, byte(in)));
      break;
    case 5: {
      int rc = ymx_ping(sd->s, u32(in));
      CHECK(rc == (sd->dead ? sd->dead : YMX_OK));
      break;
    }
    case 6: {
      int rc = ymx_go_away(sd->s, byte(in) % 4);
      uint32_t id;
      CHECK(rc == (sd->dead ? sd->dead : YMX_OK));
      if (!sd->dead) CHECK(ymx_open(sd->s, &id) == YMX_EGOAWAY);
      break;
    }
    default: { /* drop some output unread (raw mode only) */
      const uint8_t *q;
      size_t len, n;
      uint8_t b = byte(in);
      ymx_out_peek(sd->s, &q, &len);
      n = b == 255 ? len : (size_t)b * b;
      if (n > len) n = len;
      drop(sd, n);
      break;
    }
  }
}

/* -------------------------------------------------------- raw mode */

static uint32_t raw_length(side *sd, uint32_t id, uint8_t b, input *in) {
  rec *r;
  if (b < 160) return b;
  switch (b % 12) {
    case 0:
      return 0;
    case 1:
      return 64 * KIB;
    case 2:
      return 128 * KIB;
    case 3:
      return YMX_INITIAL_WINDOW;
    case 4:
      return YMX_INITIAL_WINDOW + 1;
    case 5:
      return 0xffffffffu;
    case 6:
    case 7: /* exactly what the stream's window has left, or one more */
      r = find(sd, id);
      if (!r) return 1000;
      /* Our model of the peer's view: initial - buffered - unannounced is
       * not known here; recv_buffered bounds it from above. */
      return YMX_INITIAL_WINDOW - ymx_recv_buffered(sd->s, id) + (b % 12 - 6);
    default:
      return u32(in);
  }
}

/* A frame from a few input bytes, its DATA payload from the pattern,
 * fed in two pieces split where the input says. */
static void raw_frame(side *sd, input *in) {
  static uint8_t buf[YMX_HEADER_SIZE + 300 * KIB];
  uint8_t a = byte(in), b = byte(in), c, cut;
  ymx_header h;
  size_t pay, total, k;
  h.version = 0;
  h.type = a & 3;
  h.flags = (uint16_t)(a >> 2 & 15);
  switch (a >> 6) {
    case 0:
      h.stream_id = b;
      break;
    case 1:
      h.stream_id = pick_id(sd, b);
      break;
    case 2: /* the peer's next id, with SYN */
      h.stream_id = sd->next_peer_id;
      sd->next_peer_id += 2;
      h.flags |= YMX_SYN;
      if (h.type > YMX_WINDOW_UPDATE) h.type = YMX_WINDOW_UPDATE;
      break;
    default:
      h.stream_id = u32(in);
      break;
  }
  if (h.type >= YMX_PING && (b & 1)) h.stream_id = 0;
  c = byte(in);
  h.length = raw_length(sd, h.stream_id, c, in);
  cut = byte(in);
  ymx_header_encode(&h, buf);
  pay = h.type == YMX_DATA ? h.length : 0;
  if (pay > 300 * KIB) pay = (size_t)cut * 97; /* the rest never comes */
  memcpy(buf + YMX_HEADER_SIZE, pat_at(h.stream_id, 0), pay);
  total = YMX_HEADER_SIZE + pay;
  k = total * cut / 256;
  h_feed(sd, buf, k);
  h_feed(sd, buf + k, total - k);
}

static void run_raw(world *w, input *in) {
  side *sd = &w->sides[0];
  int steps = 0;
  while (in->n > 0 && steps++ < 2000) {
    uint8_t op = byte(in);
    if (op < 96) {
      raw_frame(sd, in);
    } else if (op < 128) { /* raw bytes, split in two feeds */
      size_t n = byte(in), k;
      uint8_t cut = byte(in);
      if (n > in->n) n = in->n;
      k = n * cut / 256;
      h_feed(sd, in->p, k);
      h_feed(sd, in->p + k, n - k);
      in->p += n;
      in->n -= n;
    } else {
      app_op(sd, op, in);
    }
    check_side(sd);
  }
}

/* ------------------------------------------------------- pair mode */

/* Up to n bytes of from's output into to; a flipped byte if asked. */
static void transfer(world *w, side *from, side *to, size_t n, int flip,
                     uint8_t pos, uint8_t mask) {
  static uint8_t tmp[64 * KIB];
  const uint8_t *q;
  size_t len;
  while (n > 0) {
    size_t k;
    ymx_out_peek(from->s, &q, &len);
    if (len == 0) break;
    k = len < n ? len : n;
    if (k > sizeof tmp) k = sizeof tmp;
    memcpy(tmp, q, k);
    drop(from, k);
    if (flip && mask) {
      tmp[pos % k] ^= mask;
      w->mutated = 1;
      flip = 0;
    }
    h_feed(to, tmp, k);
    n -= k;
  }
}

/* Flow control across the wire: what a sender may still send plus what
 * its receiver holds unconsumed never exceeds the window (the rest is in
 * flight or announced-to-be).  Only without a flipped byte. */
static void check_windows(world *w) {
  int k;
  size_t i;
  if (w->mutated) return;
  for (k = 0; k < 2; k++) {
    side *a = &w->sides[k], *b = &w->sides[!k];
    for (i = 0; i < a->nrec; i++) {
      uint32_t id = a->recs[i].id;
      uint64_t sum =
          (uint64_t)ymx_send_window(a->s, id) + ymx_recv_buffered(b->s, id);
      CHECK(sum <= YMX_INITIAL_WINDOW);
    }
  }
}

static void run_pair(world *w, input *in) {
  int steps = 0;
  while (in->n > 0 && steps++ < 2000) {
    uint8_t op = byte(in);
    side *sd = &w->sides[op >> 7];
    side *other = &w->sides[!(op >> 7)];
    if ((op & 0x70) < 0x60 && (op & 7) != 7) {
      app_op(sd, op, in);
    } else if ((op & 0x70) < 0x60) {
      /* Dropping output unread would lose stream bytes: in pair mode
       * this op moves the bytes to the other side instead. */
      uint8_t b = byte(in);
      transfer(w, sd, other, (size_t)b * b + 1, 0, 0, 0);
    } else { /* transfer sd's output to the other side */
      uint8_t b = byte(in);
      size_t n = b >= 240 ? SIZE_MAX : (size_t)b * 61 + 1;
      int flip = (op & 0x70) == 0x70 && (op & 8);
      uint8_t pos = 0, mask = 0;
      if (flip) {
        pos = byte(in);
        mask = byte(in);
      }
      transfer(w, sd, other, n, flip, pos, mask);
    }
    check_side(&w->sides[0]);
    check_side(&w->sides[1]);
    check_windows(w);
    if (!w->mutated) CHECK(!w->sides[0].dead && !w->sides[1].dead);
  }
  /* Drain both ways: still no error, and the two sides agree. */
  {
    int i;
    for (i = 0; i < 64; i++) {
      transfer(w, &w->sides[0], &w->sides[1], SIZE_MAX, 0, 0, 0);
      transfer(w, &w->sides[1], &w->sides[0], SIZE_MAX, 0, 0, 0);
      check_side(&w->sides[0]);
      check_side(&w->sides[1]);
    }
    if (!w->mutated) CHECK(!w->sides[0].dead && !w->sides[1].dead);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static const uint32_t limits[] = {1, 2, 3, 4, 8, 16, 64, 0};
  static world w;
  input in = {data, size};
  uint8_t mode, knobs;
  int i;
  if (!pattern[1]) {
    size_t k;
    /* Periodic, so that any offset's bytes continue from pat_at(). */
    for (k = 0; k < sizeof pattern; k++)
      pattern[k] = (uint8_t)(k % PAT_PERIOD * 7 + (k % PAT_PERIOD >> 8) + 1);
  }
  if (size < 2) return 0;
  mode = byte(&in);
  knobs = byte(&in);
  memset(&w, 0, sizeof w);
  w.pair = mode & 1;
  w.refuse = knobs & 3;
  w.reset_in_data = knobs >> 2 & 1;
  w.consume_in_data = knobs >> 3 & 1;
  w.close_in_fin = knobs >> 4 & 1;
  w.write_in_open = knobs >> 5 & 1;
  w.open_in_data = knobs >> 6 & 1;
  for (i = 0; i < 2; i++) {
    side *sd = &w.sides[i];
    ymx_config cfg;
    cfg.is_client = w.pair ? i == 0 : mode >> 1 & 1;
    cfg.max_streams = limits[(mode >> (2 + 3 * i)) & 7];
    sd->is_client = cfg.is_client;
    sd->max_streams = cfg.max_streams ? cfg.max_streams : 1024;
    sd->world = &w;
    sd->next_peer_id = sd->is_client ? 2 : 1;
    sd->s = ymx_new(&cfg, &callbacks, sd);
    CHECK(sd->s != NULL);
  }
  if (w.pair)
    run_pair(&w, &in);
  else
    run_raw(&w, &in);
  for (i = 0; i < 2; i++) {
    check_side(&w.sides[i]);
    ymx_free(w.sides[i].s);
  }
  return 0;
}
