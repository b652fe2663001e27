/*
 * call.c - application calls (rpcplugin_call, rpcplugin.h): a method of an
 * application service served without the C core's batches and tags.
 *
 * Each call is an rp_call of the call engine (common/callengine.c) in the
 * call set of whoever routed the method (a module's binding, or the host
 * itself), with an app_call as its service state.  References: the handler
 * holds the call's first reference until rpcplugin_call_finish; every
 * batch in flight holds one more (the engine's rule).  A close watch
 * (RECV_CLOSE_ON_SERVER) runs from the start and tells when the call ended
 * early.
 *
 * Locking: a.mu guards the app_call's state.  Batches are started under
 * it (the C core posts completions to the queue, never inline); user
 * callbacks run without it, on a poller thread.
 */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/support/time.h>

#include "callengine.h"

typedef struct send_item {
  grpc_byte_buffer *bb;
  size_t len;
  struct send_item *next;
} send_item;

typedef struct app_call {
  rpcplugin_call pub; /* first: the handler's pointer */
  rp_call *c;
  const char *method; /* the route's path, lives as long as the runtime */
  pthread_mutex_t mu;
  /* Held while a user callback (the handler included) runs: callbacks of
   * one call run one at a time, even with several pollers.  Recursive: a
   * callback may register another that runs at once. */
  pthread_mutex_t cb_mu;
  void *request;
  size_t request_len;
  gpr_timespec deadline;

  send_item *head, *tail;
  size_t queued; /* bytes in the queue, the one being sent included */
  size_t refused; /* the size send last refused (RPCPLUGIN_ELIMIT) */
  int sending;
  int finish_called; /* the handler let go */
  int finish_pending; /* status goes out after the queue */
  int finish_started;
  int finish_status;
  char *finish_message;
  int reading;
  int single_reply; /* unary or client streaming: one message, then status */
  int ended;     /* closed, failed or cancelled: nothing more goes out */
  int cancelled; /* ended before the status went out */

  rpcplugin_call_cb on_cancel, on_writable;
  void *on_cancel_ud, *on_writable_ud;
  rpcplugin_read_cb read_cb;
  void *read_ud;
} app_call;

static app_call *of(rpcplugin_call *pub) { return (app_call *)pub; }

/* Room for the message send last refused, and at least half the queue (so
 * that a stream of small messages is not woken per message); always when
 * the queue is empty or the call ended.  a.mu held. */
static int writable(const app_call *a) {
  size_t want = a->refused > RPCPLUGIN_CALL_SEND_QUEUE_BYTES / 2
                    ? a->refused
                    : RPCPLUGIN_CALL_SEND_QUEUE_BYTES / 2;
  return a->ended || a->queued == 0 ||
         a->queued + want <= RPCPLUGIN_CALL_SEND_QUEUE_BYTES;
}

/* Run a user callback of a: one at a time per call.  The caller holds a
 * reference of the call (a batch's, or the user's own). */
#define RUN_CB(a, expr)                \
  do {                                 \
    pthread_mutex_lock(&(a)->cb_mu);   \
    expr;                              \
    pthread_mutex_unlock(&(a)->cb_mu); \
  } while (0)

/* ------------------------------------------------------------ sending */

static void send_done(rp_call *c, int ok);
static void finish_done(rp_call *c, int ok);

/* Start the finish batch (a.mu held). */
static void start_finish(app_call *a) {
  grpc_byte_buffer *last = NULL;
  a->finish_pending = 0;
  a->finish_started = 1;
  /* A single reply waiting: it goes out with the status, one batch. */
  if (a->head && a->head->next == NULL && !a->sending) {
    last = a->head->bb;
    a->queued -= a->head->len;
    free(a->head);
    a->head = a->tail = NULL;
  }
  if (rp_call_finish(a->c, (grpc_status_code)a->finish_status,
                     a->finish_message, last, 0, finish_done) != 0)
    a->ended = 1;
}

/* Start the next send, or the finish after the last (a.mu held).  A
 * method with a single reply (unary, client streaming) keeps its message
 * until finish, which sends both in one batch. */
static void pump(app_call *a) {
  if (a->sending || a->ended) return;
  if (a->single_reply && !a->finish_pending) return;
  if (a->finish_pending && a->single_reply && a->head && !a->head->next) {
    start_finish(a);
    return;
  }
  if (a->head) {
    a->sending = 1;
    if (rp_call_send(a->c, a->head->bb, 0, send_done) != 0) {
      a->sending = 0;
      a->ended = 1;
    }
    return;
  }
  if (a->finish_pending) start_finish(a);
}

/* Drop every queued message; one in flight stays for send_done, which
 * pops it (a.mu held). */
static void drop_queue(app_call *a) {
  send_item **pp = &a->head;
  if (a->sending && *pp) pp = &(*pp)->next;
  while (*pp) {
    send_item *it = *pp;
    *pp = it->next;
    if (it->bb) grpc_byte_buffer_destroy(it->bb);
    a->queued -= it->len;
    free(it);
  }
  a->tail = a->head;
}

static void send_done(rp_call *c, int ok) {
  app_call *a = c->svc;
  rpcplugin_call_cb wcb = NULL;
  void *wud = NULL;
  send_item *it;
  pthread_mutex_lock(&a->mu);
  a->sending = 0;
  it = a->head;
  if (it) {
    a->head = it->next;
    if (a->head == NULL) a->tail = NULL;
    a->queued -= it->len;
    free(it); /* its buffer went with the batch */
  }
  if (!ok) {
    a->ended = 1;
    drop_queue(a);
  }
  pump(a);
  if (a->on_writable && writable(a)) {
    wcb = a->on_writable;
    wud = a->on_writable_ud;
    a->on_writable = NULL;
  }
  pthread_mutex_unlock(&a->mu);
  if (wcb) RUN_CB(a, wcb(&a->pub, wud));
}

static void finish_done(rp_call *c, int ok) {
  app_call *a = c->svc;
  (void)ok;
  pthread_mutex_lock(&a->mu);
  a->ended = 1;
  pthread_mutex_unlock(&a->mu);
}

/* ------------------------------------------------------------- ending */

static void closed(rp_call *c, int ok) {
  app_call *a = c->svc;
  rpcplugin_call_cb cb = NULL, wcb = NULL;
  void *ud = NULL, *wud = NULL;
  (void)ok;
  pthread_mutex_lock(&a->mu);
  a->ended = 1;
  if (c->cancelled) {
    /* The client left, the deadline passed, or the server cancelled it. */
    a->cancelled = 1;
    drop_queue(a);
    cb = a->on_cancel;
    ud = a->on_cancel_ud;
    a->on_cancel = NULL;
    wcb = a->on_writable;
    wud = a->on_writable_ud;
    a->on_writable = NULL;
  }
  pthread_mutex_unlock(&a->mu);
  if (cb) RUN_CB(a, cb(&a->pub, ud));
  if (wcb) RUN_CB(a, wcb(&a->pub, wud));
}

/* ------------------------------------------------------------ reading */

static void recv_done(rp_call *c, int ok) {
  app_call *a = c->svc;
  rpcplugin_read_cb cb;
  void *ud;
  grpc_byte_buffer *bb = c->recv_buf;
  c->recv_buf = NULL;
  pthread_mutex_lock(&a->mu);
  a->reading = 0;
  cb = a->read_cb;
  ud = a->read_ud;
  a->read_cb = NULL;
  pthread_mutex_unlock(&a->mu);
  if (!ok) {
    if (bb) grpc_byte_buffer_destroy(bb);
    RUN_CB(a, cb(&a->pub, RPCPLUGIN_ESHUTDOWN, NULL, 0, ud));
  } else if (bb == NULL) {
    RUN_CB(a, cb(&a->pub, 0, NULL, 0, ud));
  } else {
    grpc_slice s = rp_flatten(bb);
    grpc_byte_buffer_destroy(bb);
    RUN_CB(a, cb(&a->pub, 1, GRPC_SLICE_START_PTR(s), GRPC_SLICE_LENGTH(s),
                 ud));
    grpc_slice_unref(s);
  }
}

/* ---------------------------------------------------------------- ops */

static const char *op_method(rpcplugin_call *pub) { return of(pub)->method; }

static const void *op_request(rpcplugin_call *pub, size_t *len) {
  app_call *a = of(pub);
  if (len) *len = a->request_len;
  return a->request;
}

static int64_t op_time_left_ms(rpcplugin_call *pub) {
  app_call *a = of(pub);
  gpr_timespec now, left;
  if (gpr_time_cmp(a->deadline, gpr_inf_future(a->deadline.clock_type)) == 0)
    return -1;
  now = gpr_now(a->deadline.clock_type);
  if (gpr_time_cmp(a->deadline, now) <= 0) return 0;
  left = gpr_time_sub(a->deadline, now);
  return (int64_t)left.tv_sec * 1000 + left.tv_nsec / 1000000;
}

static int op_cancelled(rpcplugin_call *pub) {
  app_call *a = of(pub);
  int r;
  pthread_mutex_lock(&a->mu);
  r = a->cancelled;
  pthread_mutex_unlock(&a->mu);
  return r;
}

static int op_on_cancel(rpcplugin_call *pub, rpcplugin_call_cb cb, void *ud) {
  app_call *a = of(pub);
  int now;
  if (cb == NULL) return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&a->mu);
  now = a->cancelled;
  if (!now && !a->ended) {
    a->on_cancel = cb;
    a->on_cancel_ud = ud;
  }
  pthread_mutex_unlock(&a->mu);
  if (now) RUN_CB(a, cb(pub, ud));
  return 0;
}

static int op_read(rpcplugin_call *pub, rpcplugin_read_cb cb, void *ud) {
  app_call *a = of(pub);
  int rc = 0;
  if (cb == NULL) return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&a->mu);
  if (a->finish_called)
    rc = RPCPLUGIN_ESTATE;
  else if (a->reading)
    rc = RPCPLUGIN_ESTATE;
  else if (a->ended)
    rc = RPCPLUGIN_ESHUTDOWN;
  else {
    a->reading = 1;
    a->read_cb = cb;
    a->read_ud = ud;
    if (rp_call_recv(a->c, recv_done) != 0) {
      a->reading = 0;
      a->read_cb = NULL;
      rc = RPCPLUGIN_EGRPC;
    }
  }
  pthread_mutex_unlock(&a->mu);
  return rc;
}

static int op_send(rpcplugin_call *pub, const void *data, size_t len) {
  app_call *a = of(pub);
  send_item *it;
  grpc_slice s;
  int rc = 0;
  if (data == NULL && len > 0) return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&a->mu);
  if (a->finish_called) {
    rc = RPCPLUGIN_ESTATE;
  } else if (a->ended) {
    rc = RPCPLUGIN_ESHUTDOWN;
  } else if (a->queued > 0 &&
             a->queued + len > RPCPLUGIN_CALL_SEND_QUEUE_BYTES) {
    a->refused = len; /* on_writable waits until this one fits */
    rc = RPCPLUGIN_ELIMIT;
  } else if ((it = calloc(1, sizeof *it)) == NULL) {
    rc = RPCPLUGIN_ENOMEM;
  } else {
    s = grpc_slice_from_copied_buffer(data, len);
    it->bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    it->len = len;
    if (a->tail)
      a->tail->next = it;
    else
      a->head = it;
    a->tail = it;
    a->queued += len;
    a->refused = 0;
    pump(a);
  }
  pthread_mutex_unlock(&a->mu);
  return rc;
}

static int op_on_writable(rpcplugin_call *pub, rpcplugin_call_cb cb,
                          void *ud) {
  app_call *a = of(pub);
  int now;
  if (cb == NULL) return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&a->mu);
  now = writable(a);
  if (!now) {
    a->on_writable = cb;
    a->on_writable_ud = ud;
  }
  pthread_mutex_unlock(&a->mu);
  if (now) RUN_CB(a, cb(pub, ud));
  return 0;
}

static size_t op_send_queued(rpcplugin_call *pub) {
  app_call *a = of(pub);
  size_t n;
  pthread_mutex_lock(&a->mu);
  n = a->queued;
  pthread_mutex_unlock(&a->mu);
  return n;
}

static int op_finish(rpcplugin_call *pub, int status, const char *message) {
  app_call *a = of(pub);
  rp_call *c = a->c;
  pthread_mutex_lock(&a->mu);
  if (a->finish_called) {
    pthread_mutex_unlock(&a->mu);
    return RPCPLUGIN_ESTATE;
  }
  a->finish_called = 1;
  if (!a->ended) {
    a->finish_status = status < 0 || status > 16 ? GRPC_STATUS_UNKNOWN : status;
    a->finish_message = message ? strdup(message) : NULL;
    a->finish_pending = 1;
    pump(a);
  }
  pthread_mutex_unlock(&a->mu);
  rp_call_unref(c); /* the handler's reference */
  return 0;
}

static const rpcplugin_call_ops app_ops = {
    .struct_size = sizeof(rpcplugin_call_ops),
    .method = op_method,
    .request = op_request,
    .time_left_ms = op_time_left_ms,
    .cancelled = op_cancelled,
    .on_cancel = op_on_cancel,
    .read = op_read,
    .send = op_send,
    .on_writable = op_on_writable,
    .send_queued = op_send_queued,
    .finish = op_finish,
};

/* ------------------------------------------------------------- entry */

/* The engine frees the call; this frees what the app_call holds. */
static void app_free(rp_call *c) {
  app_call *a = c->svc;
  drop_queue(a);
  free(a->request);
  free(a->finish_message);
  pthread_mutex_destroy(&a->cb_mu);
  pthread_mutex_destroy(&a->mu);
}

void rp_app_call_start(rp_callset *set, const char *method, int kind,
                       rpcplugin_method_handler handler, void *handler_ctx,
                       grpc_call *call, grpc_byte_buffer *request,
                       gpr_timespec deadline) {
  rp_call *c = rp_call_adopt(set, NULL, call, sizeof(app_call));
  app_call *a;
  if (c == NULL) {
    if (request) grpc_byte_buffer_destroy(request);
    return;
  }
  a = c->svc;
  a->pub.ops = &app_ops;
  a->c = c;
  a->method = method;
  a->single_reply =
      kind == RPCPLUGIN_UNARY || kind == RPCPLUGIN_CLIENT_STREAMING;
  a->deadline = deadline;
  pthread_mutex_init(&a->mu, NULL);
  {
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&a->cb_mu, &ma);
    pthread_mutexattr_destroy(&ma);
  }
  c->on_free = app_free;
  if (request) {
    grpc_slice s = rp_flatten(request);
    grpc_byte_buffer_destroy(request);
    a->request_len = GRPC_SLICE_LENGTH(s);
    a->request = malloc(a->request_len ? a->request_len : 1);
    if (a->request) memcpy(a->request, GRPC_SLICE_START_PTR(s), a->request_len);
    grpc_slice_unref(s);
    if (a->request == NULL) {
      rp_call_cancel(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
      a->ended = 1;
    }
  }
  if (rp_call_watch_close(c, closed) != 0) a->ended = 1;
  /* The handler owns the adopt reference from here on; one more keeps the
   * call (and cb_mu) alive until it returns, even if it finished. */
  rp_call_ref(c);
  RUN_CB(a, handler(handler_ctx, &a->pub));
  rp_call_unref(c);
}
