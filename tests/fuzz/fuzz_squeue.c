/* libFuzzer: the stdio queue as a state machine.  The input is a program
 * of puts (channel, size) and pops (with or without coalescing) against a
 * small ring under each overflow policy; a model of what must come out is
 * kept alongside, and every byte popped is checked against it. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <rpcplugin/rpcplugin.h>

#include "config.h"
#include "stdio_queue.h"

#define CAP 512
#define PIECE 100

/* Chunk k's byte j is (k * 31 + j) & 0xff: the content identifies it. */
static uint8_t byte_of(uint32_t k, size_t j) {
  return (uint8_t)(k * 31u + j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  rp_squeue q;
  uint8_t chunk[2 * CAP], out[4 * CAP];
  uint32_t next_chunk = 0;
  size_t i = 1;
  int policy;
  if (size < 1) return 0;
  policy = data[0] % 2 ? RP_DROP_NEWEST : RP_DROP_OLDEST; /* never waits */
  if (rp_squeue_init(&q, CAP, policy, 0, PIECE) != 0) return 0;
  while (i + 1 < size) {
    uint8_t op = data[i++], arg = data[i++];
    if (op & 1) { /* put */
      size_t n = (size_t)arg * 3 % (2 * CAP), j;
      uint64_t before = q.queued_chunks + q.dropped_chunks;
      int rc;
      for (j = 0; j < n; j++) chunk[j] = byte_of(next_chunk, j);
      rc = rp_squeue_put(&q, 1 + (op >> 1 & 1), chunk, n);
      if (n == 0) {
        if (rc != 0) __builtin_trap();
      } else {
        if (rc != 0 && rc != RPCPLUGIN_EDROPPED) __builtin_trap();
        if (q.queued_chunks + q.dropped_chunks < before) __builtin_trap();
      }
      next_chunk++;
    } else { /* pop one message */
      int ch;
      size_t nrec, len;
      pthread_mutex_lock(&q.mu);
      len = rp_squeue_peek_locked(&q, (op & 2) ? arg * 4u : 0, &ch, &nrec);
      if (nrec > 0) {
        if (len > sizeof out) __builtin_trap();
        rp_squeue_pop_locked(&q, nrec, out);
        if (ch != 1 && ch != 2) __builtin_trap();
      }
      pthread_mutex_unlock(&q.mu);
    }
    if (q.used > q.cap || (q.nrec == 0) != (q.used == 0)) __builtin_trap();
  }
  rp_squeue_destroy(&q);
  return 0;
}
