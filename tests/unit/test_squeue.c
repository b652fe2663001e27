/*
 * test_squeue.c - the bounded stdio queue: ring arithmetic, splitting,
 * coalescing, the three overflow policies and their counters, and several
 * producers against one consumer (run under ThreadSanitizer too).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include <rpcplugin/rpcplugin.h>

#include "check.h"
#include "config.h"
#include "stdio_queue.h"

/* Pop one message (no coalescing) into buf; returns its length, -1 when
 * empty. */
static long pop1(rp_squeue *q, uint8_t *buf, int *channel, size_t max) {
  size_t nrec, len;
  pthread_mutex_lock(&q->mu);
  len = rp_squeue_peek_locked(q, max, channel, &nrec);
  if (nrec == 0) {
    pthread_mutex_unlock(&q->mu);
    return -1;
  }
  rp_squeue_pop_locked(q, nrec, buf);
  pthread_mutex_unlock(&q->mu);
  return (long)len;
}

static void test_fifo_and_wrap(void) {
  rp_squeue q;
  uint8_t buf[256];
  int ch, i;
  CHECK_EQ_INT(rp_squeue_init(&q, 256, RP_BLOCK, 0, 1000), 0);
  /* Many rounds through a small ring: every record wraps somewhere. */
  for (i = 0; i < 999; i++) {
    char msg[40];
    int n = snprintf(msg, sizeof msg, "line %d %.*s", i, i % 17, "xxxxxxxxxxxxxxxxx");
    CHECK_EQ_INT(rp_squeue_put(&q, 1 + (i & 1), msg, (size_t)n), 0);
    if (i % 3 == 2) {
      int k;
      for (k = 0; k < 3; k++) {
        char want[40];
        int wn = snprintf(want, sizeof want, "line %d %.*s", i - 2 + k,
                          (i - 2 + k) % 17, "xxxxxxxxxxxxxxxxx");
        long got = pop1(&q, buf, &ch, 0);
        CHECK_EQ_INT(got, wn);
        CHECK(got == wn && memcmp(buf, want, (size_t)wn) == 0);
        CHECK_EQ_INT(ch, 1 + ((i - 2 + k) & 1));
      }
    }
  }
  CHECK_EQ_INT(pop1(&q, buf, &ch, 0), -1);
  CHECK_EQ_INT(q.used, 0);
  CHECK_EQ_INT(q.queued_chunks, 999);
  rp_squeue_destroy(&q);
}

static void test_split_and_coalesce(void) {
  rp_squeue q;
  uint8_t in[1000], out[1000];
  size_t i, nrec, len;
  int ch;
  unsigned chunks;
  for (i = 0; i < sizeof in; i++) in[i] = (uint8_t)i;
  CHECK_EQ_INT(rp_squeue_init(&q, 4096, RP_BLOCK, 0, 300), 0);
  CHECK_EQ_INT(rp_squeue_put(&q, 2, in, 1000), 0);
  CHECK_EQ_INT(q.nrec, 4); /* 300 + 300 + 300 + 100 */
  CHECK_EQ_INT(rp_squeue_put(&q, 2, "ab", 2), 0);
  CHECK_EQ_INT(rp_squeue_put(&q, 1, "cd", 2), 0);
  pthread_mutex_lock(&q.mu);
  /* Without coalescing: one record per message. */
  len = rp_squeue_peek_locked(&q, 0, &ch, &nrec);
  CHECK(len == 300 && nrec == 1 && ch == 2);
  /* Coalescing up to 10,000 bytes: the whole chunk and "ab", not "cd". */
  len = rp_squeue_peek_locked(&q, 10000, &ch, &nrec);
  CHECK_EQ_INT(len, 1002);
  CHECK_EQ_INT(nrec, 5);
  /* Coalescing up to 650: two pieces. */
  len = rp_squeue_peek_locked(&q, 650, &ch, &nrec);
  CHECK(len == 600 && nrec == 2);
  chunks = rp_squeue_pop_locked(&q, 4, out);
  CHECK_EQ_INT(chunks, 1);
  CHECK(memcmp(in, out, 1000) == 0);
  len = rp_squeue_peek_locked(&q, 10000, &ch, &nrec);
  CHECK(len == 2 && nrec == 1 && ch == 2);
  pthread_mutex_unlock(&q.mu);
  rp_squeue_destroy(&q);
}

static void test_drop_newest(void) {
  rp_squeue q;
  uint8_t buf[64];
  int ch, i, dropped = 0;
  CHECK_EQ_INT(rp_squeue_init(&q, 1024, RP_DROP_NEWEST, 0, 1000), 0);
  /* Each 56-byte chunk is a 64-byte record: 16 fit. */
  for (i = 0; i < 40; i++) {
    uint8_t c[56];
    memset(c, i, sizeof c);
    if (rp_squeue_put(&q, 1, c, sizeof c) == RPCPLUGIN_EDROPPED) dropped++;
  }
  CHECK_EQ_INT(dropped, 24);
  CHECK_EQ_INT(q.dropped_chunks, 24);
  CHECK_EQ_INT(q.dropped_bytes, 24 * 56);
  CHECK_EQ_INT(q.queued_chunks, 16);
  CHECK(q.used <= q.cap);
  /* The kept ones are the first 16. */
  for (i = 0; i < 16; i++) {
    CHECK_EQ_INT(pop1(&q, buf, &ch, 0), 56);
    CHECK_EQ_INT(buf[0], i);
  }
  rp_squeue_destroy(&q);
}

static void test_drop_oldest(void) {
  rp_squeue q;
  uint8_t buf[64];
  int ch, i;
  CHECK_EQ_INT(rp_squeue_init(&q, 1024, RP_DROP_OLDEST, 0, 1000), 0);
  for (i = 0; i < 40; i++) {
    uint8_t c[56];
    memset(c, i, sizeof c);
    CHECK_EQ_INT(rp_squeue_put(&q, 1, c, sizeof c), 0);
  }
  CHECK_EQ_INT(q.dropped_chunks, 24);
  CHECK_EQ_INT(q.queued_chunks, 40);
  for (i = 24; i < 40; i++) {
    CHECK_EQ_INT(pop1(&q, buf, &ch, 0), 56);
    CHECK_EQ_INT(buf[0], i);
  }
  /* Larger than the whole queue: cannot be kept, counted as dropped. */
  {
    uint8_t *big = calloc(1, 4096);
    CHECK_EQ_INT(rp_squeue_put(&q, 1, big, 4096), RPCPLUGIN_EDROPPED);
    CHECK_EQ_INT(q.dropped_chunks, 25);
    free(big);
  }
  rp_squeue_destroy(&q);
}

static void test_block_timeout_and_close(void) {
  rp_squeue q;
  uint8_t c[56] = {0};
  struct timespec a, b;
  long ms;
  int i;
  CHECK_EQ_INT(rp_squeue_init(&q, 1024, RP_BLOCK, 50, 1000), 0);
  for (i = 0; i < 16; i++) CHECK_EQ_INT(rp_squeue_put(&q, 1, c, 56), 0);
  clock_gettime(CLOCK_MONOTONIC, &a);
  CHECK_EQ_INT(rp_squeue_put(&q, 1, c, 56), RPCPLUGIN_ETIMEDOUT);
  clock_gettime(CLOCK_MONOTONIC, &b);
  ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
  CHECK(ms >= 45);
  CHECK_EQ_INT(q.blocked_puts, 1);
  CHECK_EQ_INT(q.timed_out_puts, 1);
  pthread_mutex_lock(&q.mu);
  rp_squeue_close_locked(&q);
  pthread_mutex_unlock(&q.mu);
  CHECK_EQ_INT(rp_squeue_put(&q, 1, c, 56), RPCPLUGIN_ESHUTDOWN);
  rp_squeue_destroy(&q);
}

/* ---------------------------------------------- concurrent producers */

#define PRODUCERS 4
#define PER_PRODUCER 20000

typedef struct {
  rp_squeue *q;
  int id;
} prod_arg;

static void *producer(void *p) {
  prod_arg *a = p;
  uint32_t i;
  for (i = 0; i < PER_PRODUCER; i++) {
    /* Chunks of varying size, some split in pieces: [id][seq][filler]. */
    uint8_t c[200];
    size_t n = 8 + (i * 37) % 150;
    memset(c, 'a' + a->id, sizeof c);
    memcpy(c, &a->id, 4);
    memcpy(c + 4, &i, 4);
    int rc = rp_squeue_put(a->q, 1 + (a->id & 1), c, n);
    if (rc != 0 && rc != RPCPLUGIN_EDROPPED) break;
  }
  return NULL;
}

static atomic_int producers_left;

static void *producer_counted(void *p) {
  producer(p);
  atomic_fetch_sub(&producers_left, 1);
  return NULL;
}

/* Producers put PER_PRODUCER chunks each; the consumer (this thread)
 * reassembles chunks from their pieces and checks shape and order.  With
 * block nothing is lost and each producer's sequence is complete; with a
 * drop policy what arrives plus what was counted as dropped is everything,
 * and each producer's sequence only increases. */
static void test_concurrent(int overflow) {
  rp_squeue q;
  pthread_t t[PRODUCERS];
  prod_arg args[PRODUCERS];
  uint32_t next[PRODUCERS] = {0};
  long total = 0;
  uint8_t *buf = malloc(1 << 16);
  int ch, k, order_ok = 1, shape_ok = 1;
  /* A small ring and 64-byte pieces: lots of waiting and splitting. */
  CHECK_EQ_INT(rp_squeue_init(&q, 4096, overflow, 0, 64), 0);
  atomic_store(&producers_left, PRODUCERS);
  for (k = 0; k < PRODUCERS; k++) {
    args[k].q = &q;
    args[k].id = k;
    pthread_create(&t[k], NULL, producer_counted, &args[k]);
  }
  for (;;) {
    size_t nrec, len, have = 0;
    int32_t id;
    uint32_t seq;
    size_t want;
    pthread_mutex_lock(&q.mu);
    if (q.nrec == 0) {
      int done = atomic_load(&producers_left) == 0;
      pthread_mutex_unlock(&q.mu);
      if (done) break;
      sched_yield();
      continue;
    }
    /* Pop records until one ends a chunk; the rest of a chunk may still be
     * on its way (a blocked writer holds the turn, so nothing else comes
     * between). */
    for (;;) {
      unsigned ended;
      while (q.nrec == 0) {
        pthread_mutex_unlock(&q.mu);
        sched_yield();
        pthread_mutex_lock(&q.mu);
      }
      len = rp_squeue_peek_locked(&q, 0, &ch, &nrec);
      ended = rp_squeue_pop_locked(&q, 1, buf + have);
      have += len;
      if (ended) break;
    }
    pthread_mutex_unlock(&q.mu);
    memcpy(&id, buf, 4);
    memcpy(&seq, buf + 4, 4);
    if (id < 0 || id >= PRODUCERS) {
      fprintf(stderr, "bad chunk: id %d, %zu bytes\n", (int)id, have);
      shape_ok = 0;
      break;
    }
    want = 8 + (seq * 37) % 150;
    if (have != want || ch != 1 + (id & 1)) shape_ok = 0;
    for (k = 8; k < (int)have; k++)
      if (buf[k] != 'a' + id) shape_ok = 0;
    if (overflow == RP_BLOCK ? seq != next[id] : seq < next[id])
      order_ok = 0;
    next[id] = seq + 1;
    total++;
  }
  for (k = 0; k < PRODUCERS; k++) pthread_join(t[k], NULL);
  CHECK(shape_ok);
  CHECK(order_ok);
  if (overflow == RP_BLOCK) {
    CHECK_EQ_INT(total, (long)PRODUCERS * PER_PRODUCER);
    CHECK_EQ_INT(q.dropped_chunks, 0);
  } else {
    CHECK_EQ_INT(total + (long)q.dropped_chunks, (long)PRODUCERS * PER_PRODUCER);
  }
  CHECK_EQ_INT(q.used, 0);
  free(buf);
  rp_squeue_destroy(&q);
}

int main(void) {
  test_fifo_and_wrap();
  test_split_and_coalesce();
  test_drop_newest();
  test_drop_oldest();
  test_block_timeout_and_close();
  test_concurrent(RP_BLOCK);
  test_concurrent(RP_DROP_NEWEST);
  test_concurrent(RP_DROP_OLDEST);
  return check_report("test_squeue");
}
