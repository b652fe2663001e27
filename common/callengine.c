/*
 * callengine.c - see callengine.h.
 *
 * Every batch goes through start_op(), which takes a reference for the op
 * and marks its slot busy; op_done() (called by the host's poller with the
 * op's tag) clears the slot, runs the service's callback and drops the
 * reference.  So a call is freed exactly when no batch is in flight and
 * the service let go of it, and every tag comes back exactly once.
 */
#include "callengine.h"
#include "monotime.h"
#include "rp_tsan.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>

static void set_log(rp_callset *set, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_log(rp_callset *set, int level, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  if (set->log == NULL) return;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  set->log(set->log_ctx, level, buf);
}

void rp_callset_init(rp_callset *set,
                     void (*log)(void *ctx, int level, const char *msg),
                     void *log_ctx) {
  memset(set, 0, sizeof *set);
  pthread_mutex_init(&set->mu, NULL);
  rp_cond_init_monotonic(&set->cv);
  atomic_init(&set->total, 0);
  set->log = log;
  set->log_ctx = log_ctx;
}

void rp_callset_destroy(rp_callset *set) {
  pthread_cond_destroy(&set->cv);
  pthread_mutex_destroy(&set->mu);
}

size_t rp_callset_count(rp_callset *set) {
  size_t n;
  pthread_mutex_lock(&set->mu);
  n = set->ncalls;
  pthread_mutex_unlock(&set->mu);
  return n;
}

static void op_done(rpcplugin_tag *tag, int ok) {
  rp_op *op = (rp_op *)tag;
  rp_call *c = op->call;
  rp_call_cb cb = op->cb;
  atomic_store(&op->busy, 0);
  if (cb) cb(c, ok);
  rp_call_unref(c);
}

static int start_op(rp_call *c, rp_op *op, const grpc_op *ops, size_t n,
                    rp_call_cb cb) {
  grpc_call_error e;
  int expected = 0;
  if (!atomic_compare_exchange_strong(&op->busy, &expected, 1))
    return RPCPLUGIN_ESTATE;
  op->cb = cb;
  rp_call_ref(c);
  RP_TSAN_RELEASE(op->relay ? (void *)&op->relay->tag : &op->tag);
  e = grpc_call_start_batch(c->call, ops, n,
                            op->relay ? (void *)&op->relay->tag : &op->tag,
                            NULL);
  if (e != GRPC_CALL_OK) {
    set_log(c->set, RPCPLUGIN_LOG_ERROR, "rpcplugin: start_batch: %s",
           grpc_call_error_to_string(e));
    atomic_store(&op->busy, 0);
    rp_call_unref(c);
    return RPCPLUGIN_EGRPC;
  }
  return 0;
}

static void init_op(rp_op *op, rp_call *c) {
  op->tag.on_done = op_done;
  op->call = c;
  atomic_init(&op->busy, 0);
}

rp_call *rp_call_adopt(rp_callset *set, RP_CALL_OWNER *owner, grpc_call *call,
                       size_t svc_size) {
  rp_call *c = calloc(1, sizeof *c + svc_size);
  int cancel_now;
  if (c == NULL) {
    grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                 "out of memory", NULL);
    grpc_call_unref(call);
    return NULL;
  }
  c->set = set;
  c->inst = owner;
  c->call = call;
  atomic_init(&c->refs, 1);
  c->svc = svc_size ? (void *)(c + 1) : NULL;
  init_op(&c->send_op, c);
  init_op(&c->recv_op, c);
  init_op(&c->finish_op, c);
  init_op(&c->close_op, c);
  pthread_mutex_lock(&set->mu);
  c->next = set->calls;
  if (set->calls) set->calls->prev = c;
  set->calls = c;
  set->ncalls++;
  cancel_now = set->cancelling;
  pthread_mutex_unlock(&set->mu);
  atomic_fetch_add(&set->total, 1);
  if (cancel_now)
    grpc_call_cancel_with_status(call, GRPC_STATUS_UNAVAILABLE,
                                 "plugin is shutting down", NULL);
  return c;
}

void rp_call_ref(rp_call *c) { atomic_fetch_add(&c->refs, 1); }

void rp_call_unref(rp_call *c) {
  rp_callset *set;
  if (atomic_fetch_sub(&c->refs, 1) != 1) return;
  set = c->set;
  /* Whatever touches the owner's memory (the service state's on_free, the
   * host API table c->host points into) comes before the unlink: once the
   * set is empty, whoever waits for it (a stop, a swap) may free the owner.
   * The set's walks only look at c->call, which stays until after. */
  if (c->on_free) c->on_free(c);
  /* Buffers of ops that never started, or results nobody took. */
  if (c->send_buf) grpc_byte_buffer_destroy(c->send_buf);
  if (c->finish_buf) grpc_byte_buffer_destroy(c->finish_buf);
  if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
  if (c->has_details) grpc_slice_unref(c->status_details);
  if (c->host) {
    if (c->send_op.relay) c->host->relay_free(c->host->host_ctx, c->send_op.relay);
    if (c->recv_op.relay) c->host->relay_free(c->host->host_ctx, c->recv_op.relay);
    if (c->close_op.relay)
      c->host->relay_free(c->host->host_ctx, c->close_op.relay);
  }
  pthread_mutex_lock(&set->mu);
  if (c->prev)
    c->prev->next = c->next;
  else
    set->calls = c->next;
  if (c->next) c->next->prev = c->prev;
  set->ncalls--;
  if (set->ncalls == 0) pthread_cond_broadcast(&set->cv);
  pthread_mutex_unlock(&set->mu);
  /* Only c's own memory and gRPC's (the host keeps gRPC initialised). */
  if (c->call) grpc_call_unref(c->call);
  free(c);
}

int rp_call_use_relays(rp_call *c, const rpcplugin_host_api *host) {
  rp_op *ops[3];
  int i;
  if (host == NULL || !RPCPLUGIN_HOST_HAS(host, relay_free) ||
      host->relay_new == NULL || host->relay_retarget == NULL)
    return RPCPLUGIN_EUNSUPPORTED;
  ops[0] = &c->send_op;
  ops[1] = &c->recv_op;
  ops[2] = &c->close_op;
  for (i = 0; i < 3; i++) {
    ops[i]->relay = host->relay_new(host->host_ctx, &ops[i]->tag);
    if (ops[i]->relay == NULL) {
      while (--i >= 0) {
        host->relay_free(host->host_ctx, ops[i]->relay);
        ops[i]->relay = NULL;
      }
      return RPCPLUGIN_ENOMEM;
    }
  }
  c->host = host;
  return 0;
}

int rp_call_export(rp_call *c, rp_call_handoff *out) {
  rp_op *ops[3];
  rpcplugin_relay **slots[3];
  int i;
  memset(out, 0, sizeof *out);
  if (c->host == NULL || atomic_load(&c->finish_op.busy))
    return RPCPLUGIN_ESTATE;
  ops[0] = &c->send_op;
  ops[1] = &c->recv_op;
  ops[2] = &c->close_op;
  slots[0] = &out->send;
  slots[1] = &out->recv;
  slots[2] = &out->close;
  /* First detach all three: a callback still running may start a batch on
   * another slot until it returns. */
  for (i = 0; i < 3; i++)
    c->host->relay_retarget(c->host->host_ctx, ops[i]->relay, NULL);
  for (i = 0; i < 3; i++) {
    if (atomic_load(&ops[i]->busy)) {
      *slots[i] = ops[i]->relay;
      atomic_store(&ops[i]->busy, 0);
      atomic_fetch_sub(&c->refs, 1); /* the batch's reference */
    } else {
      c->host->relay_free(c->host->host_ctx, ops[i]->relay);
    }
    ops[i]->relay = NULL;
  }
  /* The C core took the slices of a message in flight when its batch
   * started; the emptied buffer is ours. */
  if (c->send_buf) {
    grpc_byte_buffer_destroy(c->send_buf);
    c->send_buf = NULL;
  }
  if (c->recv_buf) {
    grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = NULL;
  }
  out->call = c->call;
  out->md_sent = c->md_sent;
  c->call = NULL;
  c->host = NULL;
  return 0;
}

static void send_op_done(rpcplugin_tag *tag, int ok);
static void recv_op_done(rpcplugin_tag *tag, int ok);
static void close_op_done(rpcplugin_tag *tag, int ok);

rp_call *rp_call_import(rp_callset *set, RP_CALL_OWNER *owner,
                        const rpcplugin_host_api *host,
                        const rpcplugin_handover_stream *hs,
                        size_t svc_size) {
  rp_call *c = rp_call_adopt(set, owner, hs->call, svc_size);
  rpcplugin_relay *given[3];
  rp_op *ops[3];
  int i;
  if (c == NULL) return NULL; /* the call was cancelled and released */
  given[0] = hs->send;
  given[1] = hs->recv;
  given[2] = hs->close;
  ops[0] = &c->send_op;
  ops[1] = &c->recv_op;
  ops[2] = &c->close_op;
  c->md_sent = hs->metadata_sent;
  c->host = host;
  c->send_op.tag.on_done = send_op_done;
  c->recv_op.tag.on_done = recv_op_done;
  c->close_op.tag.on_done = close_op_done;
  for (i = 0; i < 3; i++) {
    if (given[i]) {
      ops[i]->relay = given[i];
      ops[i]->handed_in = 1;
      atomic_store(&ops[i]->busy, 1);
      rp_call_ref(c); /* the pending batch's */
    } else {
      /* Detached until rp_call_resume, like the given ones. */
      ops[i]->relay = host->relay_new(host->host_ctx, NULL);
      if (ops[i]->relay == NULL) {
        /* Out of memory: this slot works without a relay (the call can
         * then not move again). */
      }
    }
  }
  return c;
}

void rp_call_resume(rp_call *c, rp_call_cb send_cb, rp_call_cb recv_cb,
                    rp_call_cb close_cb) {
  rp_op *ops[3];
  rp_call_cb cbs[3];
  int i;
  ops[0] = &c->send_op;
  ops[1] = &c->recv_op;
  ops[2] = &c->close_op;
  cbs[0] = send_cb;
  cbs[1] = recv_cb;
  cbs[2] = close_cb;
  /* Only the batches that came over: one the service started since the
   * import has its own callback (replacing it lost the completion of a
   * stdio write a put started on a stream just handed in; the stream then
   * never wrote again: test_swaps_under_traffic, about 1 run in 17 under
   * ASan). */
  for (i = 0; i < 3; i++)
    if (ops[i]->handed_in) {
      ops[i]->cb = cbs[i];
      ops[i]->handed_in = 0;
    }
  rp_call_ref(c); /* a delivered completion may drop the last one */
  for (i = 0; i < 3; i++)
    if (ops[i]->relay)
      c->host->relay_retarget(c->host->host_ctx, ops[i]->relay, &ops[i]->tag);
  rp_call_unref(c);
}

/* Results that a relay received: move them into the call first. */
static void close_op_done(rpcplugin_tag *tag, int ok) {
  rp_op *op = (rp_op *)tag;
  if (op->relay) op->call->cancelled = op->relay->cancelled;
  op_done(tag, ok);
}

static void recv_op_done(rpcplugin_tag *tag, int ok) {
  rp_op *op = (rp_op *)tag;
  if (op->relay) {
    rp_call *c = op->call;
    if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = op->relay->recv_message;
    op->relay->recv_message = NULL;
  }
  op_done(tag, ok);
}

int rp_call_watch_close(rp_call *c, rp_call_cb cb) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled =
      c->close_op.relay ? &c->close_op.relay->cancelled : &c->cancelled;
  c->close_op.tag.on_done = close_op_done;
  return start_op(c, &c->close_op, &op, 1, cb);
}

/* The send slot is free again before the service's callback runs, so the
 * callback may send the next message at once.  (The C core has moved the
 * slices out of the sent buffer by now: a service that may need to send a
 * message again keeps its own reference to the slices.) */
static void send_op_done(rpcplugin_tag *tag, int ok) {
  rp_op *op = (rp_op *)tag;
  rp_call *c = op->call;
  rp_call_cb cb = op->cb;
  grpc_byte_buffer *sent = c->send_buf;
  c->send_buf = NULL;
  atomic_store(&op->busy, 0);
  if (cb) cb(c, ok);
  if (sent) grpc_byte_buffer_destroy(sent);
  rp_call_unref(c);
}

static int start_send(rp_call *c, grpc_byte_buffer *bb, uint32_t flags,
                      rp_call_cb cb) {
  grpc_op ops[2];
  size_t n = 0;
  int rc, md_was_sent = c->md_sent;
  if (atomic_load(&c->send_op.busy)) return RPCPLUGIN_ESTATE;
  memset(ops, 0, sizeof ops);
  if (!c->md_sent) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = 1;
  }
  if (bb) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].flags = flags;
    ops[n++].data.send_message.send_message = bb;
  }
  if (n == 0) return RPCPLUGIN_EINVAL;
  c->send_op.tag.on_done = send_op_done;
  /* Set before the batch starts: it may complete on another poller before
   * start_op returns. */
  c->send_buf = bb;
  rc = start_op(c, &c->send_op, ops, n, cb);
  if (rc != 0) {
    c->send_buf = NULL;
    c->md_sent = md_was_sent;
  }
  return rc;
}

int rp_call_send(rp_call *c, grpc_byte_buffer *bb, uint32_t flags,
                 rp_call_cb cb) {
  return start_send(c, bb, flags, cb);
}

int rp_call_send_metadata(rp_call *c, rp_call_cb cb) {
  if (c->md_sent) return RPCPLUGIN_ESTATE;
  return start_send(c, NULL, 0, cb);
}

int rp_call_recv(rp_call *c, rp_call_cb cb) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  if (c->recv_buf) {
    grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = NULL;
  }
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message =
      c->recv_op.relay ? &c->recv_op.relay->recv_message : &c->recv_buf;
  c->recv_op.tag.on_done = recv_op_done;
  return start_op(c, &c->recv_op, &op, 1, cb);
}

static void finish_op_done(rpcplugin_tag *tag, int ok) {
  rp_op *op = (rp_op *)tag;
  rp_call *c = op->call;
  grpc_byte_buffer *bb = c->finish_buf;
  c->finish_buf = NULL;
  if (bb) grpc_byte_buffer_destroy(bb);
  op_done(tag, ok);
}

int rp_call_finish(rp_call *c, grpc_status_code status, const char *details,
                   grpc_byte_buffer *msg, int with_close, rp_call_cb cb) {
  grpc_op ops[4];
  size_t n = 0;
  int rc;
  if (atomic_load(&c->finish_op.busy) || c->has_details) {
    if (msg) grpc_byte_buffer_destroy(msg);
    return RPCPLUGIN_ESTATE;
  }
  memset(ops, 0, sizeof ops);
  if (!c->md_sent) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = 1;
  }
  if (msg) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = msg;
    c->finish_buf = msg;
  }
  c->status_details = grpc_slice_from_copied_string(details ? details : "");
  c->has_details = 1;
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = status;
  ops[n++].data.send_status_from_server.status_details =
      details ? &c->status_details : NULL;
  if (with_close) {
    ops[n].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    ops[n++].data.recv_close_on_server.cancelled = &c->cancelled;
  }
  c->finish_op.tag.on_done = finish_op_done;
  rc = start_op(c, &c->finish_op, ops, n, cb);
  if (rc != 0 && c->finish_buf) {
    grpc_byte_buffer_destroy(c->finish_buf);
    c->finish_buf = NULL;
  }
  return rc;
}

void rp_call_cancel(rp_call *c, grpc_status_code status, const char *details) {
  if (c->call) grpc_call_cancel_with_status(c->call, status, details, NULL);
}

void rp_unary_reply(rp_callset *set, RP_CALL_OWNER *owner, grpc_call *call,
                    grpc_status_code status, const char *details,
                    grpc_byte_buffer *msg, rp_call_cb cb) {
  rp_call *c = rp_call_adopt(set, owner, call, 0);
  if (c == NULL) {
    if (msg) grpc_byte_buffer_destroy(msg);
    return;
  }
  if (rp_call_finish(c, status, details, msg, 1, cb) != 0 && cb) cb(c, 0);
  rp_call_unref(c);
}

void rp_callset_cancel(rp_callset *set) {
  rp_call *c;
  pthread_mutex_lock(&set->mu);
  set->cancelling = 1;
  for (c = set->calls; c; c = c->next)
    if (c->call) /* NULL: handed over to another instance */
      grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE,
                                 "plugin is shutting down", NULL);
  pthread_mutex_unlock(&set->mu);
}

size_t rp_callset_wait(rp_callset *set, long timeout_ms) {
  struct timespec until;
  size_t n;
  rp_deadline_after_ms(&until, timeout_ms < 0 ? 0 : timeout_ms);
  pthread_mutex_lock(&set->mu);
  while (set->ncalls > 0) {
    if (timeout_ms < 0)
      pthread_cond_wait(&set->cv, &set->mu);
    else if (pthread_cond_timedwait(&set->cv, &set->mu, &until) == ETIMEDOUT)
      break;
  }
  n = set->ncalls;
  pthread_mutex_unlock(&set->mu);
  return n;
}

grpc_slice rp_flatten(grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader r;
  grpc_slice s;
  if (bb == NULL || !grpc_byte_buffer_reader_init(&r, bb))
    return grpc_empty_slice();
  s = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  return s;
}

/* Calls whose status is already on its way (their finish batch started:
 * a unary reply, a stream's OK after its flush) are left to complete for
 * up to this long; cancelling them would replace a reply the client is
 * about to read by UNAVAILABLE (seen at swaps: a Health/Check answered by
 * the old instance just before it stopped). */
#define RP_FINISH_GRACE_MS 1000

void rp_callset_cancel_and_drain(rp_callset *set) {
  rp_call *c;
  pthread_mutex_lock(&set->mu);
  set->cancelling = 1;
  for (c = set->calls; c; c = c->next)
    if (c->call && !atomic_load(&c->finish_op.busy))
      grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE,
                                   "plugin is shutting down", NULL);
  pthread_mutex_unlock(&set->mu);
  if (rp_callset_wait(set, RP_FINISH_GRACE_MS) == 0) return;
  rp_callset_cancel(set); /* a client that does not take its status */
  rp_callset_wait(set, -1);
}
