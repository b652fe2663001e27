/*
 * yamux.c - hashicorp/yamux (spec.md, version 0) as a sans-I/O state
 * machine; the contract and the choices are in yamux.h.
 *
 * Shape: one input parser (a 12-byte header buffer, then a payload count
 * that is delivered straight from the caller's buffer, never copied), one
 * output queue (a single contiguous buffer, so ymx_out_peek hands out
 * everything pending at once), and a stream table (open addressing with
 * linear probing over pointers to separately allocated streams).
 *
 * Callbacks may re-enter the session and reset, close or open streams, so
 * no stream pointer is kept across a callback: the id is looked up again
 * afterwards.  That is sound because an id is never reused while a frame
 * is being processed: our ids only grow, and the peer's ids appear only
 * from ymx_feed, which is not re-entrant.
 */
#include "yamux.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DATA_FRAME (64u * 1024u)
/* A window update is due when this much was consumed since the last one:
 * the peer is then at most half a window from stalling. */
#define UPDATE_THRESHOLD (YMX_INITIAL_WINDOW / 2)
#define DEFAULT_MAX_STREAMS 1024u
#define OUT_INITIAL 4096u
/* An output buffer larger than this is released once drained, so one
 * burst does not pin its peak size for the whole session. */
#define OUT_KEEP (512u * 1024u)
#define TABLE_MIN_BITS 4

typedef struct ymx_stream {
  uint32_t id;
  uint32_t send_window;
  /* What the peer may still send: its own view of our window.  With
   * buffered and unannounced it always sums to YMX_INITIAL_WINDOW. */
  uint32_t recv_window;
  uint32_t buffered;    /* received, not yet ymx_consumed */
  uint32_t unannounced; /* consumed, not yet sent as a window update */
  unsigned char local_fin, remote_fin;
  unsigned char owe_ack;   /* the peer opened it: our first frame has ACK */
  unsigned char await_ack; /* we opened it and saw no ACK yet */
} ymx_stream;

struct ymx_session {
  ymx_callbacks cb;
  void *ud;
  int is_client;
  uint32_t max_streams;
  uint64_t next_id; /* 64 bits: running past 2^32-1 is detectable */

  ymx_stream **slots;
  unsigned bits; /* slots has 1 << bits entries (0: not allocated) */
  size_t count;

  uint8_t *out;
  size_t out_head, out_len, out_cap;

  uint8_t hdr[YMX_HEADER_SIZE];
  size_t hdr_have;
  int in_payload; /* the bytes that follow are a DATA payload */
  int pay_skip;   /* ... of a stream that is unknown, refused or gone */
  int pay_fin;    /* the frame had FIN: apply it after the payload */
  uint32_t pay_id;
  uint32_t pay_left;

  int dead; /* 0, or YMX_EPROTO / YMX_ENOMEM: sticky */
  int in_feed;
  int local_go_away, remote_go_away;
};

/* ------------------------------------------------------------ codec */

static void put32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
         (uint32_t)p[3];
}

void ymx_header_encode(const ymx_header *h, uint8_t out[YMX_HEADER_SIZE]) {
  out[0] = h->version;
  out[1] = h->type;
  out[2] = (uint8_t)(h->flags >> 8);
  out[3] = (uint8_t)h->flags;
  put32(out + 4, h->stream_id);
  put32(out + 8, h->length);
}

void ymx_header_decode(const uint8_t in[YMX_HEADER_SIZE], ymx_header *h) {
  h->version = in[0];
  h->type = in[1];
  h->flags = (uint16_t)(in[2] << 8 | in[3]);
  h->stream_id = get32(in + 4);
  h->length = get32(in + 8);
}

int ymx_header_check(const ymx_header *h) {
  if (h->version != 0 || h->type > YMX_GO_AWAY) return YMX_EPROTO;
  return 0;
}

/* ------------------------------------------------------ stream table */

static size_t slot_of(const ymx_session *s, uint32_t id) {
  /* Fibonacci hashing, top bits: ids of one parity would otherwise land
   * on half the slots. */
  return (size_t)((uint32_t)(id * 0x9E3779B1u) >> (32 - s->bits));
}

static ymx_stream *find(const ymx_session *s, uint32_t id) {
  size_t i, mask;
  if (s->bits == 0) return NULL;
  mask = ((size_t)1 << s->bits) - 1;
  for (i = slot_of(s, id); s->slots[i]; i = (i + 1) & mask)
    if (s->slots[i]->id == id) return s->slots[i];
  return NULL;
}

static void place(ymx_session *s, ymx_stream *st) {
  size_t mask = ((size_t)1 << s->bits) - 1, i = slot_of(s, st->id);
  while (s->slots[i]) i = (i + 1) & mask;
  s->slots[i] = st;
}

/* Keeps the load at most one half, so probes stay short. */
static int table_insert(ymx_session *s, ymx_stream *st) {
  if (s->bits == 0 || (s->count + 1) * 2 > ((size_t)1 << s->bits)) {
    unsigned nbits = s->bits ? s->bits + 1 : TABLE_MIN_BITS;
    ymx_stream **old = s->slots;
    size_t i, oldn = s->bits ? (size_t)1 << s->bits : 0;
    ymx_stream **ns;
    if (nbits > 31) return YMX_ENOMEM;
    ns = calloc((size_t)1 << nbits, sizeof *ns);
    if (!ns) return YMX_ENOMEM;
    s->slots = ns;
    s->bits = nbits;
    for (i = 0; i < oldn; i++)
      if (old[i]) place(s, old[i]);
    free(old);
  }
  place(s, st);
  s->count++;
  return 0;
}

/* Removes and frees the stream; backward-shift deletion leaves no
 * tombstones, so lookups never slow down with churn. */
static void table_remove(ymx_session *s, uint32_t id) {
  size_t mask, i, j;
  if (s->bits == 0) return;
  mask = ((size_t)1 << s->bits) - 1;
  for (i = slot_of(s, id); s->slots[i]; i = (i + 1) & mask)
    if (s->slots[i]->id == id) break;
  if (!s->slots[i]) return;
  free(s->slots[i]);
  s->slots[i] = NULL;
  s->count--;
  for (j = (i + 1) & mask; s->slots[j]; j = (j + 1) & mask) {
    size_t k = slot_of(s, s->slots[j]->id);
    /* Move slots[j] into the hole at i unless its home k lies
     * cyclically in (i, j]. */
    int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
    if (!stays) {
      s->slots[i] = s->slots[j];
      s->slots[j] = NULL;
      i = j;
    }
  }
}

/* ------------------------------------------------------- output queue */

/* Room for n more bytes at the end of the queue.  The queue always keeps
 * YMX_HEADER_SIZE bytes spare, so the GO_AWAY of a protocol error can be
 * queued even when memory has run out (slack: use that spare). */
static uint8_t *out_reserve(ymx_session *s, size_t n, int slack) {
  uint8_t *p;
  size_t need;
  /* Compact when the dead front is at least as large as what is live:
   * each byte is moved at most once per time it is queued, on average. */
  if (s->out_head > 0 && s->out_head >= s->out_len - s->out_head) {
    memmove(s->out, s->out + s->out_head, s->out_len - s->out_head);
    s->out_len -= s->out_head;
    s->out_head = 0;
  }
  if (n > SIZE_MAX - YMX_HEADER_SIZE - s->out_len) return NULL;
  need = s->out_len + n + YMX_HEADER_SIZE;
  if (need > s->out_cap) {
    size_t cap = s->out_cap ? s->out_cap : OUT_INITIAL;
    uint8_t *nb;
    while (cap < need) cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    nb = realloc(s->out, cap);
    if (nb) {
      s->out = nb;
      s->out_cap = cap;
    } else if (!(slack && s->out_len + n <= s->out_cap)) {
      return NULL;
    }
  }
  p = s->out + s->out_len;
  s->out_len += n;
  return p;
}

static int emit(ymx_session *s, uint8_t type, uint16_t flags, uint32_t id,
                uint32_t length) {
  ymx_header h;
  uint8_t *p = out_reserve(s, YMX_HEADER_SIZE, 0);
  if (!p) return YMX_ENOMEM;
  h.version = 0;
  h.type = type;
  h.flags = flags;
  h.stream_id = id;
  h.length = length;
  ymx_header_encode(&h, p);
  return 0;
}

size_t ymx_out_pending(const ymx_session *s) {
  return s->out_len - s->out_head;
}

void ymx_out_peek(const ymx_session *s, const uint8_t **p, size_t *len) {
  *len = s->out_len - s->out_head;
  *p = *len ? s->out + s->out_head : NULL;
}

void ymx_out_drop(ymx_session *s, size_t n) {
  size_t pending = s->out_len - s->out_head, live;
  s->out_head += n < pending ? n : pending;
  live = s->out_len - s->out_head;
  if (live == 0) {
    s->out_head = s->out_len = 0;
    if (s->out_cap > OUT_KEEP) {
      uint8_t *nb = realloc(s->out, OUT_INITIAL);
      if (nb) {
        s->out = nb;
        s->out_cap = OUT_INITIAL;
      }
    }
  } else if (s->out_cap > OUT_KEEP && live <= s->out_cap / 4) {
    /* A burst's buffer, now mostly empty but never drained to zero: give
     * the surplus back (halving at least, so the moves stay amortized). */
    size_t cap = live * 2 > OUT_KEEP ? live * 2 : OUT_KEEP;
    uint8_t *nb;
    memmove(s->out, s->out + s->out_head, live);
    s->out_head = 0;
    s->out_len = live;
    nb = realloc(s->out, cap);
    if (nb) {
      s->out = nb;
      s->out_cap = cap;
    }
  }
}

/* -------------------------------------------------------- session */

ymx_session *ymx_new(const ymx_config *cfg, const ymx_callbacks *cb, void *ud) {
  ymx_session *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  if (cb) s->cb = *cb;
  s->ud = ud;
  s->is_client = cfg && cfg->is_client;
  s->max_streams =
      cfg && cfg->max_streams ? cfg->max_streams : DEFAULT_MAX_STREAMS;
  s->next_id = s->is_client ? 1 : 2;
  /* The spare bytes out_reserve keeps for a GO_AWAY exist from the start. */
  s->out = malloc(OUT_INITIAL);
  if (!s->out) {
    free(s);
    return NULL;
  }
  s->out_cap = OUT_INITIAL;
  return s;
}

void ymx_free(ymx_session *s) {
  size_t i, n;
  if (!s) return;
  n = s->bits ? (size_t)1 << s->bits : 0;
  for (i = 0; i < n; i++) free(s->slots[i]);
  free(s->slots);
  free(s->out);
  free(s);
}

static void proto_error(ymx_session *s) {
  uint8_t *p;
  ymx_header h = {0, YMX_GO_AWAY, 0, 0, YMX_GOAWAY_PROTO};
  if (s->dead) return;
  s->dead = YMX_EPROTO;
  s->local_go_away = 1;
  p = out_reserve(s, YMX_HEADER_SIZE, 1);
  if (p) ymx_header_encode(&h, p);
}

/* Out of memory while handling input: the session cannot keep its
 * promises (an ACK or RST would be missing), so it ends like a protocol
 * error, minus the GO_AWAY. */
static void fail_nomem(ymx_session *s) {
  if (!s->dead) s->dead = YMX_ENOMEM;
}

static ymx_stream *stream_new(uint32_t id) {
  ymx_stream *st = calloc(1, sizeof *st);
  if (!st) return NULL;
  st->id = id;
  st->send_window = YMX_INITIAL_WINDOW;
  st->recv_window = YMX_INITIAL_WINDOW;
  return st;
}

/* A window update carrying flags (and whatever consumption is not yet
 * announced: it goes out anyway). */
static int send_update(ymx_session *s, ymx_stream *st, uint16_t flags) {
  uint32_t delta = st->unannounced;
  if (st->owe_ack) flags |= YMX_ACK;
  if (emit(s, YMX_WINDOW_UPDATE, flags, st->id, delta) != 0) return YMX_ENOMEM;
  st->owe_ack = 0;
  st->recv_window += delta;
  st->unannounced = 0;
  return 0;
}

static void skip_payload(ymx_session *s, const ymx_header *h) {
  if (h->type == YMX_DATA && h->length > 0) {
    s->in_payload = 1;
    s->pay_skip = 1;
    s->pay_fin = 0;
    s->pay_id = h->stream_id;
    s->pay_left = h->length;
  }
}

/* The peer's FIN on id (after the frame's payload, if any). */
static void remote_fin(ymx_session *s, uint32_t id) {
  ymx_stream *st = find(s, id);
  if (!st) return;
  st->remote_fin = 1;
  if (s->cb.on_fin) s->cb.on_fin(s->ud, id);
  st = find(s, id);
  if (st && st->local_fin) {
    table_remove(s, id);
    if (s->cb.on_closed) s->cb.on_closed(s->ud, id);
  }
}

/* A SYN: returns 1 when the stream now exists (accepted), 0 when it was
 * refused (the caller skips the rest of the frame), -1 on a session error. */
static int incoming_syn(ymx_session *s, const ymx_header *h) {
  uint32_t id = h->stream_id;
  ymx_stream *st;
  int rc;
  /* The peer is the server (even ids) when we are the client. */
  if (id == 0 || (id & 1u) == (s->is_client ? 1u : 0u) || find(s, id)) {
    proto_error(s);
    return -1;
  }
  /* A new stream's window is the initial one: a valid peer never sends
   * more with its SYN, whether or not we would accept it. */
  if (h->type == YMX_DATA && h->length > YMX_INITIAL_WINDOW) {
    proto_error(s);
    return -1;
  }
  /* After our GO_AWAY (as Go's incomingStream), beyond max_streams, or
   * without memory for it: refused with RST, the session goes on. */
  st = s->local_go_away || s->count >= s->max_streams ? NULL : stream_new(id);
  if (st && table_insert(s, st) != 0) {
    free(st);
    st = NULL;
  }
  if (!st) {
    if (emit(s, YMX_WINDOW_UPDATE, YMX_RST, id, 0) != 0) {
      fail_nomem(s);
      return -1;
    }
    return 0;
  }
  st->owe_ack = 1;
  rc = s->cb.on_open ? s->cb.on_open(s->ud, id) : 0;
  st = find(s, id); /* on_open may have reset it */
  if (rc != 0) {
    if (st) {
      table_remove(s, id);
      if (emit(s, YMX_WINDOW_UPDATE, YMX_RST, id, 0) != 0) {
        fail_nomem(s);
        return -1;
      }
    }
    return 0;
  }
  if (!st) return 0;
  /* on_open may have written already, and that DATA frame carried the
   * ACK; otherwise the ACK goes out now. */
  if (st->owe_ack && send_update(s, st, 0) != 0) {
    fail_nomem(s);
    return -1;
  }
  return 1;
}

static void stream_frame(ymx_session *s, const ymx_header *h) {
  uint32_t id = h->stream_id;
  int is_data = h->type == YMX_DATA;
  ymx_stream *st;
  if (h->flags & YMX_SYN) {
    int rc = incoming_syn(s, h);
    if (rc < 0) return;
    if (rc == 0) {
      skip_payload(s, h);
      return;
    }
  }
  st = find(s, id);
  /* Unknown: most likely a stream we reset or refused, with frames of it
   * still in flight. */
  if (!st) {
    skip_payload(s, h);
    return;
  }
  /* After the peer's FIN no data and no second FIN may follow (Go: a
   * second FIN is ErrUnexpectedFlag, a session error). */
  if (st->remote_fin && ((is_data && h->length > 0) || (h->flags & YMX_FIN))) {
    proto_error(s);
    return;
  }
  if (is_data && h->length > st->recv_window) {
    proto_error(s);
    return;
  }
  if ((h->flags & YMX_ACK) && st->await_ack) {
    st->await_ack = 0;
    if (s->cb.on_ack) s->cb.on_ack(s->ud, id);
    if (!(st = find(s, id))) {
      skip_payload(s, h);
      return;
    }
  }
  if (h->flags & YMX_RST) {
    table_remove(s, id);
    if (s->cb.on_reset) s->cb.on_reset(s->ud, id);
    skip_payload(s, h);
    return;
  }
  if (!is_data) {
    /* The delta before the FIN: a FIN may complete the close and make
     * the stream vanish. */
    if (h->length > 0) {
      st->send_window = h->length > UINT32_MAX - st->send_window
                            ? UINT32_MAX
                            : st->send_window + h->length;
      if (s->cb.on_window) s->cb.on_window(s->ud, id);
    }
    if (h->flags & YMX_FIN) remote_fin(s, id);
    return;
  }
  if (h->length == 0) {
    if (h->flags & YMX_FIN) remote_fin(s, id);
    return;
  }
  s->in_payload = 1;
  s->pay_skip = 0;
  s->pay_fin = (h->flags & YMX_FIN) != 0;
  s->pay_id = id;
  s->pay_left = h->length;
}

static void on_header(ymx_session *s) {
  ymx_header h;
  ymx_header_decode(s->hdr, &h);
  if (ymx_header_check(&h) != 0) {
    proto_error(s);
    return;
  }
  switch (h.type) {
    case YMX_PING:
      if (h.stream_id != 0) {
        proto_error(s);
      } else if (h.flags & YMX_SYN) {
        if (emit(s, YMX_PING, YMX_ACK, 0, h.length) != 0) fail_nomem(s);
      } else if ((h.flags & YMX_ACK) && s->cb.on_pong) {
        s->cb.on_pong(s->ud, h.length);
      }
      break;
    case YMX_GO_AWAY:
      if (h.stream_id != 0) {
        proto_error(s);
        break;
      }
      s->remote_go_away = 1;
      if (s->cb.on_go_away) s->cb.on_go_away(s->ud, h.length);
      break;
    default:
      stream_frame(s, &h);
      break;
  }
}

/* A piece of the current DATA payload. */
static void deliver(ymx_session *s, const uint8_t *p, uint32_t n) {
  ymx_stream *st = find(s, s->pay_id);
  if (!st) { /* reset or closed by a callback: drop the rest */
    s->pay_skip = 1;
    return;
  }
  /* Checked against recv_window when the header arrived; the payload
   * only takes what that check allowed. */
  st->recv_window -= n;
  st->buffered += n;
  if (s->cb.on_data) s->cb.on_data(s->ud, s->pay_id, p, n);
}

int ymx_feed(ymx_session *s, const uint8_t *p, size_t n) {
  if (s->dead) return s->dead;
  if (s->in_feed) return YMX_EINVAL;
  s->in_feed = 1;
  while (n > 0 && !s->dead) {
    if (!s->in_payload) {
      size_t take = YMX_HEADER_SIZE - s->hdr_have;
      if (take > n) take = n;
      memcpy(s->hdr + s->hdr_have, p, take);
      s->hdr_have += take;
      p += take;
      n -= take;
      if (s->hdr_have == YMX_HEADER_SIZE) {
        s->hdr_have = 0;
        on_header(s);
      }
    } else {
      uint32_t take = n < s->pay_left ? (uint32_t)n : s->pay_left;
      /* Counted before the callback, which may look at the session. */
      s->pay_left -= take;
      if (!s->pay_skip) deliver(s, p, take);
      p += take;
      n -= take;
      if (s->pay_left == 0) {
        s->in_payload = 0;
        if (!s->pay_skip && s->pay_fin) remote_fin(s, s->pay_id);
      }
    }
  }
  s->in_feed = 0;
  return s->dead;
}

/* ------------------------------------------------------- application */

int ymx_open(ymx_session *s, uint32_t *id) {
  ymx_stream *st;
  uint32_t nid;
  if (s->dead) return s->dead;
  if (s->local_go_away || s->remote_go_away) return YMX_EGOAWAY;
  if (s->count >= s->max_streams || s->next_id > UINT32_MAX) return YMX_ELIMIT;
  nid = (uint32_t)s->next_id;
  st = stream_new(nid);
  if (!st) return YMX_ENOMEM;
  if (table_insert(s, st) != 0) {
    free(st);
    return YMX_ENOMEM;
  }
  if (emit(s, YMX_WINDOW_UPDATE, YMX_SYN, nid, 0) != 0) {
    table_remove(s, nid);
    return YMX_ENOMEM;
  }
  st->await_ack = 1;
  s->next_id += 2;
  if (id) *id = nid;
  return YMX_OK;
}

long ymx_write(ymx_session *s, uint32_t id, const uint8_t *p, size_t n) {
  ymx_stream *st;
  size_t total, frames, done;
  uint8_t *out;
  if (s->dead) return s->dead;
  if (!(st = find(s, id))) return YMX_ENOSTREAM;
  if (st->local_fin) return YMX_ECLOSED;
  total = n < st->send_window ? n : st->send_window;
  if (total > (size_t)LONG_MAX) total = (size_t)LONG_MAX;
  if (total == 0) return 0;
  /* One reservation for all frames: on failure nothing is queued. */
  frames = (total + MAX_DATA_FRAME - 1) / MAX_DATA_FRAME;
  out = out_reserve(s, total + frames * YMX_HEADER_SIZE, 0);
  if (!out) return YMX_ENOMEM;
  for (done = 0; done < total;) {
    ymx_header h = {0, YMX_DATA, 0, id, 0};
    size_t chunk =
        total - done < MAX_DATA_FRAME ? total - done : MAX_DATA_FRAME;
    if (st->owe_ack) { /* written from on_open: the ACK rides along */
      h.flags = YMX_ACK;
      st->owe_ack = 0;
    }
    h.length = (uint32_t)chunk;
    ymx_header_encode(&h, out);
    memcpy(out + YMX_HEADER_SIZE, p + done, chunk);
    out += YMX_HEADER_SIZE + chunk;
    done += chunk;
  }
  st->send_window -= (uint32_t)total;
  return (long)total;
}

uint32_t ymx_send_window(const ymx_session *s, uint32_t id) {
  const ymx_stream *st = find(s, id);
  return st ? st->send_window : 0;
}

int ymx_consumed(ymx_session *s, uint32_t id, size_t n) {
  ymx_stream *st;
  if (s->dead) return s->dead;
  if (!(st = find(s, id))) return YMX_ENOSTREAM;
  if (n > st->buffered) return YMX_EINVAL;
  st->buffered -= (uint32_t)n;
  st->unannounced += (uint32_t)n;
  if (st->unannounced >= UPDATE_THRESHOLD && send_update(s, st, 0) != 0) {
    st->unannounced -= (uint32_t)n;
    st->buffered += (uint32_t)n;
    return YMX_ENOMEM;
  }
  return YMX_OK;
}

int ymx_close(ymx_session *s, uint32_t id) {
  ymx_stream *st;
  if (s->dead) return s->dead;
  if (!(st = find(s, id))) return YMX_ENOSTREAM;
  if (st->local_fin) return YMX_ECLOSED;
  /* Everything written is queued already, so the FIN follows it. */
  if (send_update(s, st, YMX_FIN) != 0) return YMX_ENOMEM;
  st->local_fin = 1;
  if (st->remote_fin) {
    table_remove(s, id);
    if (s->cb.on_closed) s->cb.on_closed(s->ud, id);
  }
  return YMX_OK;
}

int ymx_reset(ymx_session *s, uint32_t id) {
  if (s->dead) return s->dead;
  if (!find(s, id)) return YMX_ENOSTREAM;
  if (emit(s, YMX_WINDOW_UPDATE, YMX_RST, id, 0) != 0) return YMX_ENOMEM;
  table_remove(s, id);
  return YMX_OK;
}

int ymx_ping(ymx_session *s, uint32_t opaque) {
  if (s->dead) return s->dead;
  return emit(s, YMX_PING, YMX_SYN, 0, opaque);
}

int ymx_go_away(ymx_session *s, uint32_t code) {
  int rc;
  if (s->dead) return s->dead;
  rc = emit(s, YMX_GO_AWAY, 0, 0, code);
  if (rc == 0) s->local_go_away = 1;
  return rc;
}

size_t ymx_stream_count(const ymx_session *s) {
  return s->count;
}

uint32_t ymx_recv_buffered(const ymx_session *s, uint32_t id) {
  const ymx_stream *st = find(s, id);
  return st ? st->buffered : 0;
}

int ymx_remote_go_away(const ymx_session *s) {
  return s->remote_go_away;
}
