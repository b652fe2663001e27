/*
 * stdio_queue.h - the bounded, multi-producer queue behind put_line.
 *
 * A byte ring of fixed capacity holds records: an 8-byte header (length,
 * channel, "last piece of a chunk") and the data, padded to 8 bytes, so a
 * header never wraps and the data wraps at most once.  The capacity bounds
 * everything put_line keeps: data plus 8..15 bytes per record.  No
 * allocation and no system call on the put path unless a producer has to
 * wait.
 *
 * Chunks longer than piece_max are split into consecutive records of the
 * same channel.  The pieces of one chunk are never interleaved with another
 * producer's records: a put that has to wait or to split holds the
 * "writer" turn and other producers wait behind it.
 *
 * Overflow (a record that does not fit):
 *   block       wait for space, up to block_timeout_ms (0: no limit);
 *   drop_oldest drop whole records from the head until it fits;
 *   drop_newest drop the new chunk.
 * A chunk larger than the whole capacity cannot be kept by the drop
 * policies and is dropped (counted); block streams it through piece by
 * piece.
 *
 * Consumers (the stream side) share the queue's mutex `mu`: functions
 * named *_locked require it.  After a put added records, the queue asks
 * wants_kick (under mu) and, when it says so, calls kick (without mu), so
 * an idle consumer can start sending.
 */
#ifndef RPCPLUGIN_STDIO_QUEUE_H
#define RPCPLUGIN_STDIO_QUEUE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct rp_squeue {
  pthread_mutex_t mu;
  pthread_cond_t space_cv; /* CLOCK_MONOTONIC */

  uint8_t *buf;
  size_t cap;  /* multiple of 8 */
  size_t head; /* oldest record */
  size_t tail; /* next write */
  size_t used; /* bytes of records, headers and padding included */
  size_t nrec;

  int overflow;
  long block_timeout_ms;
  size_t piece_max;
  int closed;
  int writer_busy;
  size_t waiters;
  size_t wake_free; /* wake waiters once this much is free */

  /* Counters (under mu). */
  uint64_t queued_chunks, queued_bytes;
  uint64_t dropped_chunks, dropped_bytes;
  uint64_t blocked_puts, timed_out_puts;

  int (*wants_kick)(void *ctx); /* under mu */
  void (*kick)(void *ctx);      /* without mu */
  void *ctx;
} rp_squeue;

/* capacity is rounded down to a multiple of 8 (at least 64);
 * piece_max >= 1.  Returns 0 or RPCPLUGIN_ENOMEM. */
int rp_squeue_init(rp_squeue *q, size_t capacity, int overflow,
                   long block_timeout_ms, size_t piece_max);
void rp_squeue_destroy(rp_squeue *q);

/* 0; RPCPLUGIN_EDROPPED (this chunk dropped); RPCPLUGIN_ETIMEDOUT (block
 * timeout; pieces queued before it stay queued); RPCPLUGIN_ESHUTDOWN. */
int rp_squeue_put(rp_squeue *q, int channel, const void *data, size_t len);

/* Refuse further puts and wake every waiting producer. */
void rp_squeue_close_locked(rp_squeue *q);

/* The next message: the head record, plus (when max_bytes > 0) the
 * following records of the same channel while the data total stays within
 * max_bytes.  Returns the data bytes (0: empty), sets *channel and *nrec. */
size_t rp_squeue_peek_locked(const rp_squeue *q, size_t max_bytes,
                             int *channel, size_t *nrec);

/* Copy the data of the first nrec records to dst, remove them and wake
 * producers.  Returns how many of them ended a chunk. */
unsigned rp_squeue_pop_locked(rp_squeue *q, size_t nrec, uint8_t *dst);

#endif
