/*
 * stdio_queue.c - see stdio_queue.h.
 */
#include "stdio_queue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rpcplugin/rpcplugin.h>

#include "monotime.h"

#define HDR 8u
#define F_LAST 1u
/* Blocked producers wake when this much (or a quarter of the queue, if
 * less, or what the largest waiter needs, if more) is free. */
#define LOW_WATER ((size_t)256 * 1024)

typedef struct rec_hdr {
  uint32_t len;
  uint16_t channel;
  uint16_t flags;
} rec_hdr;

static size_t pad8(size_t n) { return (n + 7u) & ~(size_t)7u; }
static size_t rec_size(size_t len) { return HDR + pad8(len); }

int rp_squeue_init(rp_squeue *q, size_t capacity, int overflow,
                   long block_timeout_ms, size_t piece_max) {
  memset(q, 0, sizeof *q);
  capacity &= ~(size_t)7u;
  if (capacity < 64) capacity = 64;
  if (piece_max == 0) piece_max = 1;
  if (piece_max > capacity - HDR) piece_max = capacity - HDR;
  if (piece_max > UINT32_MAX) piece_max = UINT32_MAX;
  /* malloc'd, not touched: pages become resident only as data arrives. */
  q->buf = malloc(capacity);
  if (q->buf == NULL) return RPCPLUGIN_ENOMEM;
  q->cap = capacity;
  q->overflow = overflow;
  q->block_timeout_ms = block_timeout_ms;
  q->piece_max = piece_max;
  pthread_mutex_init(&q->mu, NULL);
  rp_cond_init_monotonic(&q->space_cv);
  return 0;
}

void rp_squeue_destroy(rp_squeue *q) {
  if (q->buf == NULL) return;
  pthread_cond_destroy(&q->space_cv);
  pthread_mutex_destroy(&q->mu);
  free(q->buf);
  q->buf = NULL;
}

/* ------------------------------------------------------------ ring ops */

static void ring_write(rp_squeue *q, const void *src, size_t len) {
  size_t first = q->cap - q->tail;
  if (first > len) first = len;
  memcpy(q->buf + q->tail, src, first);
  if (len > first) memcpy(q->buf, (const uint8_t *)src + first, len - first);
  q->tail = (q->tail + len) % q->cap;
}

static void push(rp_squeue *q, int channel, const void *data, size_t len,
                 int last) {
  rec_hdr h;
  h.len = (uint32_t)len;
  h.channel = (uint16_t)channel;
  h.flags = last ? F_LAST : 0;
  ring_write(q, &h, HDR);
  ring_write(q, data, len);
  q->tail = (q->tail + (pad8(len) - len)) % q->cap;
  q->used += rec_size(len);
  q->nrec++;
}

static rec_hdr header_at(const rp_squeue *q, size_t off) {
  rec_hdr h;
  memcpy(&h, q->buf + off, HDR);
  return h;
}

/* Remove the head record; copy its data to dst unless NULL. */
static rec_hdr pop_one(rp_squeue *q, uint8_t *dst) {
  rec_hdr h = header_at(q, q->head);
  size_t data = (q->head + HDR) % q->cap;
  if (dst) {
    size_t first = q->cap - data;
    if (first > h.len) first = h.len;
    memcpy(dst, q->buf + data, first);
    if (h.len > first) memcpy(dst + first, q->buf, h.len - first);
  }
  q->head = (q->head + rec_size(h.len)) % q->cap;
  q->used -= rec_size(h.len);
  q->nrec--;
  if (q->nrec == 0) q->head = q->tail = 0; /* keep writes contiguous */
  return h;
}

size_t rp_squeue_peek_locked(const rp_squeue *q, size_t max_bytes,
                             int *channel, size_t *nrec) {
  size_t off = q->head, total = 0, n = 0;
  rec_hdr first;
  *nrec = 0;
  if (q->nrec == 0) return 0;
  first = header_at(q, off);
  *channel = first.channel;
  do {
    rec_hdr h = header_at(q, off);
    if (h.channel != first.channel) break;
    if (n > 0 && total + h.len > max_bytes) break;
    total += h.len;
    n++;
    off = (off + rec_size(h.len)) % q->cap;
  } while (n < q->nrec && max_bytes > 0);
  *nrec = n;
  return total;
}

unsigned rp_squeue_pop_locked(rp_squeue *q, size_t nrec, uint8_t *dst) {
  unsigned chunks = 0;
  size_t i;
  for (i = 0; i < nrec && q->nrec > 0; i++) {
    rec_hdr h = pop_one(q, dst);
    if (dst) dst += h.len;
    if (h.flags & F_LAST) chunks++;
  }
  /* Wake waiting producers only once a good amount is free (or the queue
   * is empty), not at every record: a producer woken per record puts one
   * record and sleeps again, a context switch per chunk. */
  if (q->waiters && (q->nrec == 0 || q->cap - q->used >= q->wake_free))
    pthread_cond_broadcast(&q->space_cv);
  return chunks;
}

void rp_squeue_close_locked(rp_squeue *q) {
  q->closed = 1;
  pthread_cond_broadcast(&q->space_cv);
}

/* ------------------------------------------------------------ producers */

static size_t chunk_size(const rp_squeue *q, size_t len) {
  size_t full = len / q->piece_max, rest = len % q->piece_max;
  return full * rec_size(q->piece_max) + (rest ? rec_size(rest) : 0);
}

static void push_chunk(rp_squeue *q, int channel, const uint8_t *p,
                       size_t len) {
  while (len > 0) {
    size_t n = len < q->piece_max ? len : q->piece_max;
    push(q, channel, p, n, n == len);
    p += n;
    len -= n;
  }
}

/* Drop whole chunks from the head until `need` bytes are free (the rest
 * of a chunk is dropped with its first piece, so no chunk is cut short by
 * this policy). */
static void drop_oldest(rp_squeue *q, size_t need) {
  int mid_chunk = 0;
  while (q->nrec > 0 && (mid_chunk || q->cap - q->used < need)) {
    rec_hdr h = pop_one(q, NULL);
    q->dropped_bytes += h.len;
    mid_chunk = !(h.flags & F_LAST);
    if (!mid_chunk) q->dropped_chunks++;
  }
}

/* Wait on space_cv until about `need` bytes may be free (0: for the
 * writer turn); returns 0, or ETIMEDOUT when the deadline passed. */
static int wait_space(rp_squeue *q, size_t need,
                      const struct timespec *deadline) {
  int rc;
  size_t low = q->cap / 4 < LOW_WATER ? q->cap / 4 : LOW_WATER;
  if (need > low) low = need;
  if (q->waiters == 0 || low > q->wake_free) q->wake_free = low;
  q->waiters++;
  if (deadline)
    rc = pthread_cond_timedwait(&q->space_cv, &q->mu, deadline);
  else
    rc = pthread_cond_wait(&q->space_cv, &q->mu);
  q->waiters--;
  return rc == ETIMEDOUT ? ETIMEDOUT : 0;
}

/* Unlock, let an idle consumer start, lock again. */
static void kick_unlocked(rp_squeue *q, int need) {
  if (!need) return;
  pthread_mutex_unlock(&q->mu);
  q->kick(q->ctx);
  pthread_mutex_lock(&q->mu);
}

static int wants_kick(rp_squeue *q) {
  return q->wants_kick && q->wants_kick(q->ctx);
}

/* The slow path of block: take the writer turn, then push piece by piece
 * as space frees.  Called with mu held; returns with mu held. */
static int put_blocking(rp_squeue *q, int channel, const uint8_t *p,
                        size_t len) {
  struct timespec dl, *deadline = NULL;
  int rc = 0;
  if (q->block_timeout_ms > 0) {
    rp_deadline_after_ms(&dl, q->block_timeout_ms);
    deadline = &dl;
  }
  q->blocked_puts++;
  while (q->writer_busy && !q->closed)
    if (wait_space(q, 0, deadline) == ETIMEDOUT) {
      q->timed_out_puts++;
      return RPCPLUGIN_ETIMEDOUT;
    }
  if (q->closed) return RPCPLUGIN_ESHUTDOWN;
  q->writer_busy = 1;
  q->queued_chunks++;
  while (len > 0) {
    size_t n = len < q->piece_max ? len : q->piece_max;
    while (!q->closed && q->cap - q->used < rec_size(n)) {
      /* Whatever is queued must drain: wake an idle consumer first. */
      kick_unlocked(q, wants_kick(q));
      if (q->closed || q->cap - q->used >= rec_size(n)) break;
      if (wait_space(q, rec_size(n), deadline) == ETIMEDOUT &&
          q->cap - q->used < rec_size(n)) {
        q->timed_out_puts++;
        rc = RPCPLUGIN_ETIMEDOUT;
        goto out;
      }
    }
    if (q->closed) {
      rc = RPCPLUGIN_ESHUTDOWN;
      goto out;
    }
    push(q, channel, p, n, n == len);
    q->queued_bytes += n;
    p += n;
    len -= n;
  }
out:
  q->writer_busy = 0;
  pthread_cond_broadcast(&q->space_cv);
  return rc;
}

int rp_squeue_put(rp_squeue *q, int channel, const void *data, size_t len) {
  size_t need = chunk_size(q, len);
  int rc = 0;

  pthread_mutex_lock(&q->mu);
  if (q->closed) {
    pthread_mutex_unlock(&q->mu);
    return RPCPLUGIN_ESHUTDOWN;
  }
  if (need <= q->cap - q->used && !q->writer_busy) {
    push_chunk(q, channel, data, len); /* the common path */
    q->queued_chunks++;
    q->queued_bytes += len;
  } else if (q->overflow == 1 /* drop_oldest */ && need <= q->cap &&
             !q->writer_busy) {
    drop_oldest(q, need);
    push_chunk(q, channel, data, len);
    q->queued_chunks++;
    q->queued_bytes += len;
  } else if (q->overflow != 0 /* a drop policy */) {
    q->dropped_chunks++;
    q->dropped_bytes += len;
    rc = RPCPLUGIN_EDROPPED;
  } else {
    rc = put_blocking(q, channel, data, len);
  }
  if (wants_kick(q)) {
    pthread_mutex_unlock(&q->mu);
    q->kick(q->ctx);
    return rc;
  }
  pthread_mutex_unlock(&q->mu);
  return rc;
}
