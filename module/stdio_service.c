/*
 * stdio_service.c - plugin.GRPCStdio/StreamStdio on the bounded queue.
 *
 * Producers (host threads) put chunks into the queue (stdio_queue.c).  Each
 * open stream has at most one write in flight, as the C core requires, and
 * no thread of its own: when a write completes, the completion (on a
 * poller) takes the next message from the queue and starts the next write.
 * A stream with nothing to send is "idle"; a put that finds an idle stream
 * starts that stream's write itself (on the producer's thread, outside the
 * queue lock), so no gRPC thread is ever woken just to look at the queue.
 *
 * Exactly once: a message leaves the queue when a stream takes it.  If its
 * write fails (the client went away), the encoded message goes to the
 * "putback" list, ordered by the sequence number it was taken with, and is
 * sent before anything still in the queue by the next stream that writes.
 * The stream keeps its own reference to the encoded slice for that: the C
 * core moves the slices out of a byte buffer it sends, so the buffer itself
 * is empty afterwards.
 * Memory is therefore the queue's bound plus at most one message per open
 * stream (in flight or put back).
 *
 * Shutdown (stop hook): close the queue to producers, finish idle streams
 * with OK, let busy ones drain the queue and then finish, all within
 * flush_deadline_ms; the instance then cancels whatever is left.
 *
 * Lock: the queue's mutex q.mu guards everything here too.
 */
#include "rp_trim.h"
#include "stdio_service.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "codec.h"
#include "engine.h"
#include "monotime.h"
#include "stdio_queue.h"

typedef struct stream stream;
struct stream {
  rp_call *c;
  stream *prev, *next;           /* all open streams */
  stream *idle_prev, *idle_next; /* idle streams */
  int idle;
  int sending;
  int closed;
  int finishing;
  int finished;
  /* The message in flight (a reference of its own, for a retry). */
  grpc_slice msg;
  uint64_t seq;
  size_t bytes;
  unsigned chunks;
};

typedef struct putback putback;
struct putback {
  grpc_slice msg;
  uint64_t seq;
  size_t bytes;
  unsigned chunks;
  putback *next;
};

struct rp_stdio {
  rp_instance *inst;
  rp_squeue q;
  size_t coalesce;
  stream *streams;
  stream *idle_head;
  size_t nstreams, nidle;
  rp_trim trim; /* memory back after a flood of streams */
  putback *putback;
  uint64_t seq;   /* from 1: 0 is what a handover brought (sent first) */
  int stopping;
  int handing;     /* a swap: no new writes, streams go to the new one */
  int nkicking;    /* producers between taking a message and its send */
  pthread_cond_t done_cv; /* CLOCK_MONOTONIC; stop waits on it */
  uint64_t sent_chunks, sent_bytes, sent_messages, resent_messages;
};

/* ------------------------------------------------------------- lists */

static void idle_push(rp_stdio *s, stream *st) {
  st->idle = 1;
  st->idle_prev = NULL;
  st->idle_next = s->idle_head;
  if (s->idle_head) s->idle_head->idle_prev = st;
  s->idle_head = st;
  s->nidle++;
}

static void idle_remove(rp_stdio *s, stream *st) {
  if (!st->idle) return;
  if (st->idle_prev)
    st->idle_prev->idle_next = st->idle_next;
  else
    s->idle_head = st->idle_next;
  if (st->idle_next) st->idle_next->idle_prev = st->idle_prev;
  st->idle = 0;
  s->nidle--;
}

static void stream_remove(rp_stdio *s, stream *st) {
  idle_remove(s, st);
  if (st->prev)
    st->prev->next = st->next;
  else if (s->streams == st)
    s->streams = st->next;
  if (st->next) st->next->prev = st->prev;
  st->prev = st->next = NULL;
  s->nstreams--;
}

/* ----------------------------------------------------------- messages */

/* Take the next message for st into st->msg (under q.mu): a put-back one
 * first, else a fresh one from the queue.  0 when there is nothing. */
static int take_locked(rp_stdio *s, stream *st) {
  if (s->putback) {
    putback *pb = s->putback;
    s->putback = pb->next;
    st->msg = pb->msg;
    st->seq = pb->seq;
    st->bytes = pb->bytes;
    st->chunks = pb->chunks;
    free(pb);
    return 1;
  } else {
    int channel;
    size_t nrec, len = rp_squeue_peek_locked(&s->q, s->coalesce, &channel,
                                             &nrec);
    uint8_t *dst;
    if (nrec == 0) return 0;
    st->msg = rp_stdio_slice(channel, len, &dst);
    st->chunks = rp_squeue_pop_locked(&s->q, nrec, dst);
    st->bytes = len;
    st->seq = s->seq++;
    return 1;
  }
}

/* Keep st's message, whose write failed, in sequence order. */
static void putback_locked(rp_stdio *s, stream *st) {
  putback *pb = malloc(sizeof *pb), **pp;
  if (pb == NULL) {
    /* Cannot keep it: count it as dropped rather than lose it silently. */
    s->q.dropped_chunks += st->chunks;
    s->q.dropped_bytes += st->bytes;
    grpc_slice_unref(st->msg);
    return;
  }
  s->resent_messages++;
  pb->msg = st->msg;
  pb->seq = st->seq;
  pb->bytes = st->bytes;
  pb->chunks = st->chunks;
  for (pp = &s->putback; *pp && (*pp)->seq < pb->seq; pp = &(*pp)->next) {
  }
  pb->next = *pp;
  *pp = pb;
}

static void send_done(rp_call *c, int ok);
static void finish_done(rp_call *c, int ok);

/* Start st's next write, or finish it, or park it as idle (under q.mu).
 * Returns 1 when st->msg is to be sent (the caller sends it after
 * unlocking); *finish is set when the stream should be finished. */
static int next_locked(rp_stdio *s, stream *st, int *finish) {
  *finish = 0;
  if (st->closed || st->finishing) return 0;
  if (s->handing) {
    idle_push(s, st);
    return 0;
  }
  if (take_locked(s, st)) {
    st->sending = 1;
    return 1;
  }
  if (s->stopping) {
    st->finishing = 1;
    *finish = 1;
  } else {
    idle_push(s, st);
  }
  return 0;
}

/* Outside the lock: act on what next_locked decided.  The caller holds a
 * reference on st->c. */
static void act(rp_stdio *s, stream *st, int send, int finish) {
  if (send) {
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&st->msg, 1);
    if (rp_call_send(st->c, bb, 0, send_done) != 0) {
      /* The call is over: treat it as a failed write. */
      grpc_byte_buffer_destroy(bb);
      pthread_mutex_lock(&s->q.mu);
      st->sending = 0;
      putback_locked(s, st);
      pthread_mutex_unlock(&s->q.mu);
    }
  } else if (finish) {
    if (rp_call_finish(st->c, GRPC_STATUS_OK, NULL, NULL, 0, finish_done) !=
        0) {
      pthread_mutex_lock(&s->q.mu);
      st->finished = 1;
      pthread_cond_broadcast(&s->done_cv);
      pthread_mutex_unlock(&s->q.mu);
    }
  }
}

/* Start writes on idle streams while there is something to send.  Called
 * by producers (through the queue's kick) and after a failed write. */
static void kick(void *ctx) {
  rp_stdio *s = ctx;
  for (;;) {
    stream *st;
    pthread_mutex_lock(&s->q.mu);
    st = s->idle_head;
    if (st == NULL || s->handing || !take_locked(s, st)) {
      pthread_mutex_unlock(&s->q.mu);
      return;
    }
    idle_remove(s, st);
    st->sending = 1;
    s->nkicking++;
    rp_call_ref(st->c);
    pthread_mutex_unlock(&s->q.mu);
    act(s, st, 1, 0);
    rp_call_unref(st->c);
    pthread_mutex_lock(&s->q.mu);
    if (--s->nkicking == 0 && s->handing) pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->q.mu);
  }
}

static int wants_kick(void *ctx) {
  rp_stdio *s = ctx;
  return s->nidle > 0;
}

static void send_done(rp_call *c, int ok) {
  stream *st = c->svc;
  rp_stdio *s = c->inst->stdio;
  int send = 0, finish = 0, rekick = 0;
  pthread_mutex_lock(&s->q.mu);
  st->sending = 0;
  if (ok) {
    s->sent_messages++;
    s->sent_chunks += st->chunks;
    s->sent_bytes += st->bytes;
    grpc_slice_unref(st->msg);
    send = next_locked(s, st, &finish);
  } else {
    /* Not handed to the client: the next writer sends it again. */
    putback_locked(s, st);
    rekick = s->nidle > 0;
  }
  if (s->stopping) pthread_cond_broadcast(&s->done_cv);
  pthread_mutex_unlock(&s->q.mu);
  act(s, st, send, finish);
  if (rekick) kick(s);
}

static void finish_done(rp_call *c, int ok) {
  stream *st = c->svc;
  rp_stdio *s = c->inst->stdio;
  (void)ok;
  pthread_mutex_lock(&s->q.mu);
  st->finished = 1;
  pthread_cond_broadcast(&s->done_cv);
  pthread_mutex_unlock(&s->q.mu);
}

static void closed(rp_call *c, int ok) {
  stream *st = c->svc;
  rp_stdio *s = c->inst->stdio;
  int trim = 0;
  (void)ok;
  pthread_mutex_lock(&s->q.mu);
  if (!st->closed) { /* closed already: handed over, or ended there */
    st->closed = 1;
    stream_remove(s, st);
    trim = rp_trim_note(&s->trim, s->nstreams);
  }
  pthread_cond_broadcast(&s->done_cv);
  pthread_mutex_unlock(&s->q.mu);
  rp_call_unref(c); /* the stream's own reference */
  if (trim) rp_trim_now();
}

/* Initial metadata went out: the stream is open for the client. */
static void opened(rp_call *c, int ok) {
  stream *st = c->svc;
  rp_stdio *s = c->inst->stdio;
  int send = 0, finish = 0;
  pthread_mutex_lock(&s->q.mu);
  st->sending = 0;
  if (ok) send = next_locked(s, st, &finish);
  pthread_mutex_unlock(&s->q.mu);
  act(s, st, send, finish);
}

static void stream_call(rp_instance *inst, grpc_call *call,
                        grpc_byte_buffer *req) {
  rp_stdio *s = inst->stdio;
  rp_call *c;
  stream *st;
  if (req) grpc_byte_buffer_destroy(req); /* google.protobuf.Empty */
  c = rp_call_adopt(&inst->calls, inst, call, sizeof(stream));
  if (c == NULL) return;
  st = c->svc;
  st->c = c;
  /* Through the host's relays when it has them: a swap can then hand the
   * stream to the next instance. */
  (void)rp_call_use_relays(c, &inst->host);
  if (rp_call_watch_close(c, closed) != 0) {
    rp_call_unref(c);
    return;
  }
  pthread_mutex_lock(&s->q.mu);
  if (s->nstreams >= inst->cfg.stdio.max_streams) {
    /* A flood of streams that never read would each hold a message in
     * flight: the client that reads would get little.  Refused; its close
     * watch finds it closed and only releases it. */
    char why[160];
    st->closed = 1;
    pthread_mutex_unlock(&s->q.mu);
    snprintf(why, sizeof why,
             "too many StreamStdio streams: %u open (config.stdio.max_streams)",
             inst->cfg.stdio.max_streams);
    rp_call_cancel(c, GRPC_STATUS_RESOURCE_EXHAUSTED, why);
    return;
  }
  st->next = s->streams;
  if (s->streams) s->streams->prev = st;
  s->streams = st;
  s->nstreams++;
  (void)rp_trim_note(&s->trim, s->nstreams);
  st->sending = 1;
  pthread_mutex_unlock(&s->q.mu);
  if (rp_call_send_metadata(c, opened) != 0) {
    pthread_mutex_lock(&s->q.mu);
    st->sending = 0;
    pthread_mutex_unlock(&s->q.mu);
    rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot start stream");
  }
}

/* ------------------------------------------------------------ service */

int rp_stdio_put(rp_stdio *s, int channel, const void *data, size_t len) {
  if (channel != RPCPLUGIN_STDOUT && channel != RPCPLUGIN_STDERR)
    return RPCPLUGIN_EINVAL;
  if (data == NULL && len > 0) return RPCPLUGIN_EINVAL;
  if (len == 0) return 0; /* nothing to deliver */
  if (s->q.overflow == RP_BLOCK && rp_on_poller(s->inst))
    return RPCPLUGIN_EWRONGTHREAD; /* would wait for itself */
  return rp_squeue_put(&s->q, channel, data, len);
}

void rp_stdio_stats(rp_stdio *s, rpcplugin_stats *out) {
  pthread_mutex_lock(&s->q.mu);
  out->stdio_queued_chunks = s->q.queued_chunks;
  out->stdio_queued_bytes = s->q.queued_bytes;
  out->stdio_sent_chunks = s->sent_chunks;
  out->stdio_sent_bytes = s->sent_bytes;
  out->stdio_sent_messages = s->sent_messages;
  out->stdio_dropped_chunks = s->q.dropped_chunks;
  out->stdio_dropped_bytes = s->q.dropped_bytes;
  out->stdio_queue_bytes = s->q.used;
  out->stdio_blocked_puts = s->q.blocked_puts;
  out->stdio_timed_out_puts = s->q.timed_out_puts;
  out->stdio_resent_messages = s->resent_messages;
  pthread_mutex_unlock(&s->q.mu);
}

static int stdio_create(rp_instance *inst, char *err, size_t errlen) {
  const rp_config *cfg = &inst->cfg;
  rp_stdio *s = calloc(1, sizeof *s);
  size_t piece;
  if (s == NULL) {
    snprintf(err, errlen, "out of memory");
    return RPCPLUGIN_ENOMEM;
  }
  /* A piece plus its framing must fit the message limit. */
  piece = cfg->stdio.max_message_bytes - 16;
  if (rp_squeue_init(&s->q, cfg->stdio.queue_bytes, cfg->stdio.overflow,
                     cfg->stdio.block_timeout_ms, piece) != 0) {
    free(s);
    snprintf(err, errlen, "cannot allocate a stdio queue of %zu bytes",
             cfg->stdio.queue_bytes);
    return RPCPLUGIN_ENOMEM;
  }
  s->q.wants_kick = wants_kick;
  s->q.kick = kick;
  s->q.ctx = s;
  s->inst = inst;
  s->coalesce = cfg->stdio.coalesce_bytes;
  if (s->coalesce > piece) s->coalesce = piece;
  rp_cond_init_monotonic(&s->done_cv);
  s->seq = 1;
  inst->stdio = s;
  return 0;
}

/* ----------------------------------------------------------- handover */

int rp_stdio_handover_out(rp_stdio *s, rp_handover *ho) {
  stream *st;
  int rc = 0;
  pthread_mutex_lock(&s->q.mu);
  s->handing = 1;
  /* Producers inside put_line return RPCPLUGIN_ESHUTDOWN (the host puts
   * their chunk to the new instance); those that took a message finish
   * starting its write first. */
  rp_squeue_close_locked(&s->q);
  while (s->nkicking > 0) pthread_cond_wait(&s->done_cv, &s->q.mu);
  for (;;) {
    rp_call_handoff ex;
    grpc_slice msg = grpc_empty_slice();
    int sending;
    rp_call *c;
    st = s->streams;
    if (st == NULL) break;
    c = st->c;
    rp_call_ref(c);
    stream_remove(s, st);
    pthread_mutex_unlock(&s->q.mu);
    /* No callback of this stream runs after this. */
    if (rp_call_export(c, &ex) != 0) {
      /* No relays (an older host): it cannot move; end it here (its watch
       * still runs closed, which finds it removed). */
      pthread_mutex_lock(&s->q.mu);
      st->closed = 1;
      pthread_mutex_unlock(&s->q.mu);
      rp_call_cancel(c, GRPC_STATUS_UNAVAILABLE, "plugin swapped");
      rp_call_unref(c);
      pthread_mutex_lock(&s->q.mu);
      continue;
    }
    pthread_mutex_lock(&s->q.mu);
    sending = st->sending && ex.send != NULL && !GRPC_SLICE_IS_EMPTY(st->msg);
    if (sending) msg = st->msg;
    st->sending = 0;
    st->closed = 1; /* no longer ours */
    pthread_mutex_unlock(&s->q.mu);
    {
      uint8_t *u = NULL;
      size_t ulen = 0;
      if (sending)
        u = rp_frame_append(NULL, &ulen, GRPC_SLICE_START_PTR(msg),
                            GRPC_SLICE_LENGTH(msg));
      if (sending && u == NULL) rc = RPCPLUGIN_ENOMEM; /* counted lost */
      if (rp_handover_add_stream(ho, "/plugin.GRPCStdio/StreamStdio", &ex,
                                 1, u, ulen) != 0) {
        rc = RPCPLUGIN_ENOMEM;
        grpc_call_cancel_with_status(ex.call, GRPC_STATUS_UNAVAILABLE,
                                     "plugin swapped", NULL);
        grpc_call_unref(ex.call);
      }
    }
    if (sending) grpc_slice_unref(msg);
    rp_call_unref(c); /* ours */
    rp_call_unref(c); /* the stream's: the watch will never call closed */
    pthread_mutex_lock(&s->q.mu);
  }
  /* What no stream took: the messages put back, then the queue. */
  while (s->putback) {
    putback *pb = s->putback;
    int channel;
    const uint8_t *data;
    size_t len;
    s->putback = pb->next;
    if (rp_stdio_parse(GRPC_SLICE_START_PTR(pb->msg),
                       GRPC_SLICE_LENGTH(pb->msg), &channel, &data,
                       &len) == 0 &&
        rp_handover_add_stdio(ho, channel, data, len) != 0)
      rc = RPCPLUGIN_ENOMEM;
    grpc_slice_unref(pb->msg);
    free(pb);
  }
  for (;;) {
    int channel;
    size_t nrec, len = rp_squeue_peek_locked(&s->q, s->coalesce, &channel,
                                             &nrec);
    uint8_t *buf;
    if (nrec == 0) break;
    buf = malloc(len ? len : 1);
    if (buf == NULL) {
      rc = RPCPLUGIN_ENOMEM;
      break;
    }
    rp_squeue_pop_locked(&s->q, nrec, buf);
    if (rp_handover_add_stdio(ho, channel, buf, len) != 0)
      rc = RPCPLUGIN_ENOMEM;
    free(buf);
  }
  pthread_mutex_unlock(&s->q.mu);
  return rc;
}

void rp_stdio_handover_in(rp_stdio *s, const rpcplugin_handover *h) {
  rp_instance *inst = s->inst;
  putback *head = NULL, **tail = &head;
  size_t off = 0, i;
  const uint8_t *p = h->stdio;
  /* 1. The old instance's output goes before anything of ours: at the
   * head of the put-back list, with sequence 0. */
  while (p && off + 5 <= h->stdio_len) {
    int channel = p[off];
    size_t len = (size_t)p[off + 1] | (size_t)p[off + 2] << 8 |
                 (size_t)p[off + 3] << 16 | (size_t)p[off + 4] << 24;
    uint8_t *dst;
    putback *pb;
    off += 5;
    if (len > h->stdio_len - off) break;
    pb = calloc(1, sizeof *pb);
    if (pb == NULL) {
      rp_log(inst, RPCPLUGIN_LOG_ERROR,
             "rpcplugin: swap: out of memory, %zu bytes of output lost",
             h->stdio_len - off);
      break;
    }
    pb->msg = rp_stdio_slice(channel, len, &dst);
    memcpy(dst, p + off, len);
    pb->bytes = len;
    pb->chunks = 1;
    pb->seq = 0;
    *tail = pb;
    tail = &pb->next;
    off += len;
  }
  pthread_mutex_lock(&s->q.mu);
  *tail = s->putback;
  s->putback = head;
  pthread_mutex_unlock(&s->q.mu);

  /* 2. The streams, with their write in flight. */
  for (i = 0; i < h->nstreams; i++) {
    const rpcplugin_handover_stream *hs = &h->streams[i];
    rp_call *c;
    stream *st;
    rp_call_cb send_cb = NULL;
    int start_md = 0;
    if (strcmp(hs->method, "/plugin.GRPCStdio/StreamStdio") != 0) continue;
    c = rp_call_import(&inst->calls, inst, &inst->host, hs, sizeof(stream));
    if (c == NULL) continue;
    st = c->svc;
    st->c = c;
    pthread_mutex_lock(&s->q.mu);
    st->next = s->streams;
    if (s->streams) s->streams->prev = st;
    s->streams = st;
    s->nstreams++;
    if (hs->send) {
      st->sending = 1;
      if (hs->unsent_len >= 4) {
        const uint8_t *u = hs->unsent;
        size_t len = (size_t)u[0] | (size_t)u[1] << 8 | (size_t)u[2] << 16 |
                     (size_t)u[3] << 24;
        if (len > hs->unsent_len - 4) len = hs->unsent_len - 4;
        st->msg = grpc_slice_from_copied_buffer((const char *)u + 4, len);
        st->bytes = len;
        st->chunks = 1;
        st->seq = 0;
        send_cb = send_done;
      } else {
        send_cb = opened; /* the initial metadata is in flight */
      }
    } else if (hs->metadata_sent) {
      idle_push(s, st);
    } else {
      st->sending = 1;
      start_md = 1;
    }
    pthread_mutex_unlock(&s->q.mu);
    rp_call_resume(c, send_cb, NULL, hs->close ? closed : NULL);
    if (!hs->close && rp_call_watch_close(c, closed) != 0) {
      rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot watch stream");
    }
    if (start_md && rp_call_send_metadata(c, opened) != 0)
      rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot start stream");
  }
  /* 3. Idle streams start on what came over. */
  kick(s);
}

/* Everything is flushed when nothing is queued, put back or in flight. */
static int drained_locked(rp_stdio *s) {
  stream *st;
  for (st = s->streams; st; st = st->next)
    if (!st->finished) return 0;
  return 1;
}

static void stdio_stop(rp_instance *inst) {
  rp_stdio *s = inst->stdio;
  struct timespec dl;
  long ms = inst->cfg.stdio.flush_deadline_ms;
  stream *st;

  rp_deadline_after_ms(&dl, ms);
  pthread_mutex_lock(&s->q.mu);
  s->stopping = 1;
  rp_squeue_close_locked(&s->q);
  /* Idle streams have nothing left to send: finish them now.  Busy ones
   * finish from their last write's completion. */
  for (;;) {
    for (st = s->streams; st; st = st->next)
      if (st->idle && !st->finishing) break;
    if (st == NULL) break;
    idle_remove(s, st);
    {
      int finish, send = next_locked(s, st, &finish);
      rp_call_ref(st->c);
      pthread_mutex_unlock(&s->q.mu);
      act(s, st, send, finish);
      rp_call_unref(st->c);
      pthread_mutex_lock(&s->q.mu);
    }
  }
  while (!drained_locked(s))
    if (pthread_cond_timedwait(&s->done_cv, &s->q.mu, &dl) == ETIMEDOUT) {
      rp_log(inst, RPCPLUGIN_LOG_WARN,
             "rpcplugin: stdio flush deadline (%ld ms) passed with %zu bytes "
             "queued",
             ms, s->q.used);
      break;
    }
  pthread_mutex_unlock(&s->q.mu);
}

static void stdio_destroy(rp_instance *inst) {
  rp_stdio *s = inst->stdio;
  if (s == NULL) return;
  while (s->putback) {
    putback *pb = s->putback;
    s->putback = pb->next;
    grpc_slice_unref(pb->msg);
    free(pb);
  }
  pthread_cond_destroy(&s->done_cv);
  rp_squeue_destroy(&s->q);
  free(s);
  inst->stdio = NULL;
}

static const rp_method_def methods[] = {
    {"/plugin.GRPCStdio/StreamStdio", RPCPLUGIN_SERVER_STREAMING,
     stream_call},
};

const rp_service rp_stdio_service = {
    .name = "plugin.GRPCStdio",
    .methods = methods,
    .nmethods = 1,
    .create = stdio_create,
    .stop = stdio_stop,
    .destroy = stdio_destroy,
};
