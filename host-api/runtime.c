/*
 * runtime.c - the host side's part of the call engine: the completion queue,
 * its pollers, method routes, and the answer UNIMPLEMENTED.
 *
 * Why here and not in the module: gRPC's C core fixes methods and
 * completion queues at grpc_server_start, and a requested call can only be
 * taken back by shutting the server down.  Keeping the queue, the
 * registrations and the outstanding requests in the runtime lets a module
 * instance come and go (a swap) on a live server: the runtime requests
 * calls, and when one arrives it hands it to whichever instance routes the
 * method now, or answers UNIMPLEMENTED.
 *
 * Every tag on the queue begins with an rpcplugin_tag; the pollers only
 * call tag->on_done(tag, ok).  The runtime's own tags are the requests
 * (rt_request), rejections (rt_reject) and the server-shutdown tag.
 *
 * Locking: rt->mu guards the method list, routes, in-flight handler counts,
 * the module list and the state.  No gRPC call that could complete inline
 * is made while it is held, and handlers run without it.
 */
#include "internal.h"
#include "mux.h"
#include "callengine.h"
#include "monotime.h"
#include "rp_tsan.h"

#include <dirent.h>
#include <errno.h>
#include <linux/sockios.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

/* Outstanding requests per registered method and for unknown methods: a
 * burst of new calls waits in the server until one is requested. */
#define REQUESTS_PER_METHOD 16
#define REQUESTS_GENERIC 4
/* At the drain: unread bytes that did not change for this long mean that
 * nobody reads them (an idle C-core client never reads the GOAWAY). */
#define RT_STALL_MS 100
/* ...and nothing unread for this many looks 2 ms apart means they read it
 * all: not fewer, because the sockets also look empty for a moment while
 * gRPC waits to write the rest of a long reply. */
#define RT_QUIET_LOOKS 10
/* How long handlers may take to finish application calls after they were
 * cancelled at shutdown. */
#define RT_CALLS_WAIT_MS 5000

/* In this order: a state compares greater than the ones before it. */
enum rt_state {
  RT_CREATED,
  RT_STARTED,
  RT_DRAINING,
  RT_DRAINED,
  RT_STOPPING,
  RT_STOPPED
};

typedef struct rt_method rt_method;
struct rt_method {
  char *path;
  int kind;
  void *reg; /* grpc_server_register_method handle */
  /* Current route; NULL handler: answered UNIMPLEMENTED. */
  rp_binding *owner; /* NULL for the host's own methods */
  rpcplugin_call_handler handler;
  void *handler_ctx;
  rt_method *next;
};

typedef struct rt_request {
  rpcplugin_tag tag;
  rpcplugin_runtime *rt;
  rt_method *m; /* NULL: generic request (unregistered methods) */
  grpc_call *call;
  gpr_timespec deadline;
  grpc_metadata_array md;
  grpc_byte_buffer *payload;
  grpc_call_details details;
} rt_request;

typedef struct rt_reject {
  rpcplugin_tag tag;
  grpc_call *call;
  grpc_slice details;
  int cancelled;
} rt_reject;

/* An application method's route: the handler, and the call set its calls
 * join (the binding's, or the runtime's for the host's own methods). */
typedef struct rt_app_route {
  rp_callset *set;
  rpcplugin_method_handler handler;
  void *handler_ctx;
  char *path;
  int kind;
  struct rt_app_route *next;
} rt_app_route;

/* A route a binding asked for while it is staged (a swap's new instance):
 * applied by rp_runtime_commit_routes. */
typedef struct rt_staged {
  rt_method *m;
  rpcplugin_call_handler handler;
  void *handler_ctx;
  struct rt_staged *next;
} rt_staged;

struct rp_binding {
  rpcplugin_runtime *rt;
  rpcplugin_module *mod;
  int inflight; /* handler calls running now */
  int staged;   /* routes wait in `pending` until the commit */
  rt_staged *pending;
  rp_callset calls;    /* the module's application calls */
  rt_app_route *apps;  /* its application routes, freed with it */
  rp_binding *next;
};

/* A relay (rpcplugin.h): the runtime's tag, forwarding to a target that a
 * handover can change.  All relays of a runtime share rt->relay_mu. */
typedef struct rt_relay {
  rpcplugin_relay pub; /* first: the C core's tag is &pub.tag */
  rpcplugin_runtime *rt;
  rpcplugin_tag *target; /* NULL: detached */
  int running;           /* callbacks into target running now */
  int kept, kept_ok;     /* a completion that came while detached */
  struct rt_relay *prev, *next;
} rt_relay;

typedef struct rt_mod_node {
  rpcplugin_module *mod;
  struct rt_mod_node *next;
} rt_mod_node;

struct rpcplugin_runtime {
  rpcplugin_runtime_options opts;
  grpc_server *server;
  grpc_completion_queue *cq;
  pthread_t *pollers;
  unsigned npollers;
  /* One per poller: odd while it runs a callback (rp_runtime_quiesce). */
  _Atomic unsigned long *poller_seq;
  atomic_uint poller_ids;

  pthread_mutex_t mu;
  pthread_cond_t cv;
  int state;
  rt_method *methods;
  rp_binding *bindings;
  rt_mod_node *modules;
  rt_request *requests;
  size_t nrequests;
  size_t outstanding; /* requests not yet returned */
  int server_down;    /* shutdown tag came back */
  int was_started;    /* at the drain: the server had started */
  struct timespec t_stop; /* when the drain began (debug traces) */
  rpcplugin_tag shutdown_tag;
  atomic_int shutdown_requested;
  rp_callset host_calls;    /* application calls of the host's own methods */
  rt_app_route *host_apps;  /* their routes */
  char *tls_cert, *tls_key, *tls_peer; /* AutoMTLS, copied from opts */
  pthread_mutex_t relay_mu; /* relays: targets, running, the list */
  pthread_cond_t relay_cv;  /* a relay's running dropped to 0 */
  rt_relay *relays;         /* live relays (freed at destroy if left) */
  void **desc;              /* descriptor sets for reflection */
  size_t *desc_len;
  size_t ndesc;
  rp_mux *_Atomic mux;      /* multiplexing (set once), or NULL */
};

/* The runtime whose poller runs on this thread (NULL elsewhere). */
static __thread rpcplugin_runtime *tls_poller;
static __thread _Atomic unsigned long *tls_poller_seq;

void rp_runtime_log(rpcplugin_runtime *rt, int level, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  if (rt->opts.log == NULL || level > rt->opts.log_level) return;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  rt->opts.log(rt->opts.user_data, level, buf);
}

/* ------------------------------------------------------------- pollers */

static void *poller_main(void *arg) {
  rpcplugin_runtime *rt = arg;
  _Atomic unsigned long *seq =
      &rt->poller_seq[atomic_fetch_add(&rt->poller_ids, 1)];
  tls_poller = rt;
  tls_poller_seq = seq;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(
        rt->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE) {
      rpcplugin_tag *t = ev.tag;
      RP_TSAN_ACQUIRE(t);
      atomic_fetch_add(seq, 1); /* odd: in a callback */
      t->on_done(t, ev.success);
      atomic_fetch_add(seq, 1);
    }
  }
  tls_poller = NULL;
  tls_poller_seq = NULL;
  return NULL;
}

/* Wait until every poller that is running a callback now has returned from
 * it.  A module's last callback may still be on its way out of the
 * module's code (returning from the call's release) when its calls are all
 * gone; the loader calls this before dlclose on a live server.  Callbacks
 * are short; this waits for the ones running, never for new ones. */
void rp_runtime_quiesce(rpcplugin_runtime *rt) {
  unsigned p, n = atomic_load(&rt->poller_ids);
  if (rt->poller_seq == NULL) return;
  for (p = 0; p < n && p < (unsigned)rt->opts.poll_threads; p++) {
    _Atomic unsigned long *sp = &rt->poller_seq[p];
    unsigned long s = atomic_load(sp);
    if (sp == tls_poller_seq || !(s & 1)) continue; /* ours, or idle */
    while (atomic_load(sp) == s) {
      struct timespec ts = {0, 20000};
      nanosleep(&ts, NULL);
    }
  }
}

/* ------------------------------------------------------------ rejects */

/* Finish `call` with `status` and release it; takes the call's reference. */
static void reject_done(rpcplugin_tag *t, int ok) {
  rt_reject *r = (rt_reject *)t;
  (void)ok;
  grpc_slice_unref(r->details);
  grpc_call_unref(r->call);
  free(r);
}

static void reject_call(rpcplugin_runtime *rt, grpc_call *call,
                        grpc_status_code status, const char *text) {
  grpc_op ops[3];
  rt_reject *r = calloc(1, sizeof *r);
  grpc_call_error e;
  if (r == NULL) {
    grpc_call_cancel_with_status(call, GRPC_STATUS_RESOURCE_EXHAUSTED,
                                 "out of memory", NULL);
    grpc_call_unref(call);
    return;
  }
  r->tag.on_done = reject_done;
  r->call = call;
  r->details = grpc_slice_from_copied_string(text);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[1].data.send_status_from_server.status = status;
  ops[1].data.send_status_from_server.status_details = &r->details;
  ops[2].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[2].data.recv_close_on_server.cancelled = &r->cancelled;
  RP_TSAN_RELEASE(&r->tag);
  e = grpc_call_start_batch(call, ops, 3, &r->tag, NULL);
  if (e != GRPC_CALL_OK) {
    rp_runtime_log(rt, RPCPLUGIN_LOG_ERROR, "rpcplugin: cannot reject call: %s",
                   grpc_call_error_to_string(e));
    reject_done(&r->tag, 0);
  }
}

/* ----------------------------------------------------------- requests */

static void request_done(rpcplugin_tag *t, int ok);

static void issue_request(rt_request *r) {
  rpcplugin_runtime *rt = r->rt;
  grpc_call_error e;
  RP_TSAN_RELEASE(&r->tag);
  if (r->m)
    e = grpc_server_request_registered_call(
        rt->server, r->m->reg, &r->call, &r->deadline, &r->md,
        (r->m->kind == RPCPLUGIN_UNARY ||
         r->m->kind == RPCPLUGIN_SERVER_STREAMING)
            ? &r->payload
            : NULL,
        rt->cq, rt->cq, &r->tag);
  else
    e = grpc_server_request_call(rt->server, &r->call, &r->details, &r->md,
                                 rt->cq, rt->cq, &r->tag);
  if (e != GRPC_CALL_OK) {
    rp_runtime_log(rt, RPCPLUGIN_LOG_ERROR,
                   "rpcplugin: cannot request calls for %s: %s",
                   r->m ? r->m->path : "unknown methods",
                   grpc_call_error_to_string(e));
    pthread_mutex_lock(&rt->mu);
    rt->outstanding--;
    pthread_cond_broadcast(&rt->cv);
    pthread_mutex_unlock(&rt->mu);
  }
}

static void request_done(rpcplugin_tag *t, int ok) {
  rt_request *r = (rt_request *)t;
  rpcplugin_runtime *rt = r->rt;
  grpc_call *call = r->call;
  grpc_byte_buffer *payload = r->payload;
  gpr_timespec deadline = r->deadline;
  char *unknown = NULL;
  int again;

  r->call = NULL;
  r->payload = NULL;
  grpc_metadata_array_destroy(&r->md);
  grpc_metadata_array_init(&r->md);
  if (r->m == NULL) {
    if (ok) unknown = grpc_slice_to_c_string(r->details.method);
    grpc_call_details_destroy(&r->details);
    grpc_call_details_init(&r->details);
  }

  pthread_mutex_lock(&rt->mu);
  again = ok && rt->state == RT_STARTED;
  if (!again) {
    rt->outstanding--;
    pthread_cond_broadcast(&rt->cv);
  }
  pthread_mutex_unlock(&rt->mu);
  /* Ask for the next call before serving this one.  If the server shuts
   * down meanwhile, the request fails back to us with ok = 0. */
  if (again) issue_request(r);
  if (!ok) return;

  if (r->m == NULL) {
    char text[512];
    int stopping;
    pthread_mutex_lock(&rt->mu);
    stopping = rt->state != RT_STARTED;
    pthread_mutex_unlock(&rt->mu);
    snprintf(text, sizeof text, "Method not found: %s",
             unknown ? unknown : "?");
    gpr_free(unknown);
    /* While stopping, every call is told the server is going away, never
     * that a method does not exist. */
    if (stopping)
      reject_call(rt, call, GRPC_STATUS_UNAVAILABLE,
                  "plugin is shutting down");
    else
      reject_call(rt, call, GRPC_STATUS_UNIMPLEMENTED, text);
    return;
  } else {
    rt_method *m = r->m;
    rpcplugin_call_handler handler;
    void *hctx;
    rp_binding *owner;
    int stopping;
    pthread_mutex_lock(&rt->mu);
    handler = m->handler;
    hctx = m->handler_ctx;
    owner = m->owner;
    stopping = rt->state != RT_STARTED;
    if (owner && handler) owner->inflight++;
    pthread_mutex_unlock(&rt->mu);
    if (handler == NULL) {
      char text[512];
      if (payload) grpc_byte_buffer_destroy(payload);
      if (stopping) {
        /* The module already let go of its routes: the method exists,
         * the server is going away (grpc-go answers the same). */
        reject_call(rt, call, GRPC_STATUS_UNAVAILABLE,
                    "plugin is shutting down");
        return;
      }
      snprintf(text, sizeof text, "Method not found: %s", m->path);
      reject_call(rt, call, GRPC_STATUS_UNIMPLEMENTED, text);
      return;
    }
    handler(hctx, call, payload, deadline);
    if (owner) {
      pthread_mutex_lock(&rt->mu);
      if (--owner->inflight == 0) pthread_cond_broadcast(&rt->cv);
      pthread_mutex_unlock(&rt->mu);
    }
  }
}

static void shutdown_tag_done(rpcplugin_tag *t, int ok) {
  rpcplugin_runtime *rt =
      (rpcplugin_runtime *)((char *)t - offsetof(rpcplugin_runtime,
                                                 shutdown_tag));
  (void)ok;
  pthread_mutex_lock(&rt->mu);
  rt->server_down = 1;
  pthread_cond_broadcast(&rt->cv);
  pthread_mutex_unlock(&rt->mu);
}

/* ------------------------------------------------------------- routes */

static rt_method *find_method(rpcplugin_runtime *rt, const char *path) {
  rt_method *m;
  for (m = rt->methods; m; m = m->next)
    if (strcmp(m->path, path) == 0) return m;
  return NULL;
}

static int add_route(rpcplugin_runtime *rt, rp_binding *owner,
                     const char *path, int kind,
                     rpcplugin_call_handler handler, void *hctx,
                     rpcplugin_error *err) {
  rt_method *m;
  int rc = 0;
  if (path == NULL || path[0] != '/' || handler == NULL || kind < 0 ||
      kind > RPCPLUGIN_BIDI_STREAMING)
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "add_method: need a path starting with '/', a handler "
                    "and a kind from 0 to 3");
  pthread_mutex_lock(&rt->mu);
  m = find_method(rt, path);
  if (m && owner && owner->staged) {
    /* A swap's new instance: the method may be served by the old one;
     * the route waits for the commit. */
    rt_staged *st;
    for (st = owner->pending; st; st = st->next)
      if (st->m == m) break;
    if (st)
      rc = rp_error(err, RPCPLUGIN_EEXIST,
                    "method %s was already added by this instance", path);
    else if (m->kind != kind)
      rc = rp_error(err, RPCPLUGIN_EINVAL,
                    "method %s was registered with kind %d, not %d", path,
                    m->kind, kind);
    else if ((st = calloc(1, sizeof *st)) == NULL)
      rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    else {
      st->m = m;
      st->handler = handler;
      st->handler_ctx = hctx;
      st->next = owner->pending;
      owner->pending = st;
    }
    pthread_mutex_unlock(&rt->mu);
    return rc;
  }
  if (m) {
    if (m->handler)
      rc = rp_error(err, RPCPLUGIN_EEXIST,
                    "method %s is already served by another instance", path);
    else if (m->kind != kind)
      rc = rp_error(err, RPCPLUGIN_EINVAL,
                    "method %s was registered with kind %d, not %d", path,
                    m->kind, kind);
  } else if (rt->state != RT_CREATED) {
    rc = rp_error(err, RPCPLUGIN_ESTATE,
                  "cannot add method %s: the server already started and "
                  "gRPC's C core fixes methods at grpc_server_start",
                  path);
  } else {
    void *reg = grpc_server_register_method(
        rt->server, path, NULL,
        (kind == RPCPLUGIN_UNARY || kind == RPCPLUGIN_SERVER_STREAMING)
            ? GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER
            : GRPC_SRM_PAYLOAD_NONE,
        0);
    if (reg == NULL) {
      rc = rp_error(err, RPCPLUGIN_EEXIST,
                    "method %s is already registered on this server", path);
    } else {
      m = calloc(1, sizeof *m);
      if (m) m->path = strdup(path);
      if (m == NULL || m->path == NULL) {
        if (m) free(m);
        m = NULL;
        rc = rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
      } else {
        m->kind = kind;
        m->reg = reg;
        m->next = rt->methods;
        rt->methods = m;
      }
    }
  }
  if (rc == 0 && m) {
    m->owner = owner;
    m->handler = handler;
    m->handler_ctx = hctx;
  }
  pthread_mutex_unlock(&rt->mu);
  return rc;
}

int rpcplugin_runtime_add_method(rpcplugin_runtime *rt, const char *path,
                                 int kind, rpcplugin_call_handler handler,
                                 void *handler_ctx, rpcplugin_error *err) {
  rp_error_clear(err);
  if (rt == NULL) return rp_error(err, RPCPLUGIN_EINVAL, "runtime is NULL");
  return add_route(rt, NULL, path, kind, handler, handler_ctx, err);
}

/* Every application call arrives here: hand it to rp_app_call_start. */
static void app_route_call(void *ctx, grpc_call *call,
                           grpc_byte_buffer *request, gpr_timespec deadline) {
  rt_app_route *r = ctx;
  rp_app_call_start(r->set, r->path, r->kind, r->handler, r->handler_ctx, call,
                    request, deadline);
}

static void log_to_runtime(void *ctx, int level, const char *msg) {
  rp_runtime_log(ctx, level, "%s", msg);
}

static int add_app_route(rpcplugin_runtime *rt, rp_binding *owner,
                         const char *path, int kind,
                         rpcplugin_method_handler handler, void *hctx,
                         rpcplugin_error *err) {
  rt_app_route *r;
  int rc;
  if (handler == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL, "add_call_method: no handler");
  r = calloc(1, sizeof *r);
  if (r == NULL || (r->path = strdup(path ? path : "")) == NULL) {
    free(r);
    return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  }
  r->set = owner ? &owner->calls : &rt->host_calls;
  r->kind = kind;
  r->handler = handler;
  r->handler_ctx = hctx;
  rc = add_route(rt, owner, path, kind, app_route_call, r, err);
  if (rc != 0) {
    free(r->path);
    free(r);
    return rc;
  }
  pthread_mutex_lock(&rt->mu);
  if (owner) {
    r->next = owner->apps;
    owner->apps = r;
  } else {
    r->next = rt->host_apps;
    rt->host_apps = r;
  }
  pthread_mutex_unlock(&rt->mu);
  return 0;
}

static void free_app_routes(rt_app_route *r) {
  while (r) {
    rt_app_route *next = r->next;
    free(r->path);
    free(r);
    r = next;
  }
}

int rpcplugin_runtime_add_call_method(rpcplugin_runtime *rt, const char *path,
                                      int kind,
                                      rpcplugin_method_handler handler,
                                      void *handler_ctx, rpcplugin_error *err) {
  rp_error_clear(err);
  if (rt == NULL) return rp_error(err, RPCPLUGIN_EINVAL, "runtime is NULL");
  return add_app_route(rt, NULL, path, kind, handler, handler_ctx, err);
}

/* ----------------------------------------------- host API for modules */

static int host_add_method(void *host_ctx, const char *path, int kind,
                           rpcplugin_call_handler handler, void *hctx,
                           char *errbuf, size_t errlen) {
  rp_binding *b = host_ctx;
  rpcplugin_error err;
  int rc = add_route(b->rt, b, path, kind, handler, hctx, &err);
  if (rc && errbuf && errlen) snprintf(errbuf, errlen, "%s", err.message);
  return rc;
}

static int host_add_call_method(void *host_ctx, const char *path, int kind,
                                rpcplugin_method_handler handler, void *hctx,
                                char *errbuf, size_t errlen) {
  rp_binding *b = host_ctx;
  rpcplugin_error err;
  int rc = add_app_route(b->rt, b, path, kind, handler, hctx, &err);
  if (rc && errbuf && errlen) snprintf(errbuf, errlen, "%s", err.message);
  return rc;
}

static int add_descriptor_set(rpcplugin_runtime *rt, const void *set,
                              size_t len, rpcplugin_error *err) {
  void **d;
  size_t *l;
  void *copy;
  if (set == NULL || len == 0)
    return rp_error(err, RPCPLUGIN_EINVAL, "add_descriptors: empty set");
  /* The same set again (a module loaded anew: a swap, a reload) is kept
   * once: sets live until rpcplugin_runtime_destroy, so storing each
   * load's copy would grow with every load. */
  pthread_mutex_lock(&rt->mu);
  {
    size_t i;
    for (i = 0; i < rt->ndesc; i++)
      if (rt->desc_len[i] == len && memcmp(rt->desc[i], set, len) == 0) {
        pthread_mutex_unlock(&rt->mu);
        return 0;
      }
  }
  pthread_mutex_unlock(&rt->mu);
  copy = malloc(len);
  if (copy == NULL) return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  memcpy(copy, set, len);
  pthread_mutex_lock(&rt->mu);
  d = realloc(rt->desc, (rt->ndesc + 1) * sizeof *d);
  if (d) rt->desc = d;
  l = d ? realloc(rt->desc_len, (rt->ndesc + 1) * sizeof *l) : NULL;
  if (l) rt->desc_len = l;
  if (d && l) {
    rt->desc[rt->ndesc] = copy;
    rt->desc_len[rt->ndesc++] = len;
  }
  pthread_mutex_unlock(&rt->mu);
  if (!d || !l) {
    free(copy);
    return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  }
  return 0;
}

int rpcplugin_runtime_add_descriptors(rpcplugin_runtime *rt,
                                      const void *descriptor_set, size_t len,
                                      rpcplugin_error *err) {
  rp_error_clear(err);
  if (rt == NULL) return rp_error(err, RPCPLUGIN_EINVAL, "runtime is NULL");
  return add_descriptor_set(rt, descriptor_set, len, err);
}

int rp_runtime_descriptor_set_at(rpcplugin_runtime *rt, size_t i,
                                 const void **set, size_t *len) {
  int found;
  pthread_mutex_lock(&rt->mu);
  found = i < rt->ndesc;
  if (found) {
    *set = rt->desc[i];
    *len = rt->desc_len[i];
  }
  pthread_mutex_unlock(&rt->mu);
  return found;
}

void rp_runtime_each_routed(rpcplugin_runtime *rt,
                            void (*fn)(void *ud, const char *path),
                            void *ud) {
  rt_method *m;
  pthread_mutex_lock(&rt->mu);
  for (m = rt->methods; m; m = m->next)
    if (m->handler) fn(ud, m->path);
  pthread_mutex_unlock(&rt->mu);
}

static int host_add_descriptors(void *host_ctx, const void *set, size_t len,
                                char *errbuf, size_t errlen) {
  rp_binding *b = host_ctx;
  rpcplugin_error err;
  int rc = add_descriptor_set(b->rt, set, len, &err);
  if (rc && errbuf && errlen) snprintf(errbuf, errlen, "%s", err.message);
  return rc;
}

/* The loaded module that serves plugin.GRPCBroker, or NULL.  The module
 * list changes only on control threads; the handle follows swaps. */
static rpcplugin_module *rt_broker_module(rpcplugin_runtime *rt) {
  rpcplugin_module *bm = NULL;
  rt_mod_node *n;
  pthread_mutex_lock(&rt->mu);
  for (n = rt->modules; n && bm == NULL; n = n->next)
    if (rpcplugin_module_services_of(n->mod) & RPCPLUGIN_SVC_BROKER)
      bm = n->mod;
  pthread_mutex_unlock(&rt->mu);
  return bm;
}

/* The multiplexer's knock before a plugin dial (its dial thread). */
static int rt_mux_knock(void *ud, uint32_t id, char *err, size_t errlen) {
  rpcplugin_runtime *rt = ud;
  rpcplugin_module *bm = rt_broker_module(rt);
  if (bm == NULL) {
    snprintf(err, errlen, "no loaded module serves plugin.GRPCBroker");
    return RPCPLUGIN_EUNSUPPORTED;
  }
  /* go-plugin's knock waits 5 s for its ack.  The client's StartStream
   * may not have reached the broker yet (a plugin dial right after the
   * client connected): go-plugin's send waits for the stream, so wait
   * for one too, within the same 5 s, looking again every 5 ms (the
   * broker has no event for "a stream opened" that the host can wait
   * on). */
  {
    const struct timespec pause = {0, 5 * 1000 * 1000};
    int64_t until = rp_mono_ms() + 5000;
    int rc, left = 5000;
    for (;;) {
      rc = rpcplugin_module_broker_knock(bm, id, "", "", left, err, errlen);
      if (rc != RPCPLUGIN_ENOTFOUND) return rc;
      left = (int)(until - rp_mono_ms());
      if (left <= 0) return rc;
      nanosleep(&pause, NULL);
    }
  }
}

/* ABI 1.3: the client knocked for id on the broker stream. */
static int host_broker_mux_knock(void *host_ctx, uint32_t id, char *err,
                                 size_t errlen) {
  rp_binding *b = host_ctx;
  rp_mux *m = atomic_load(&b->rt->mux);
  char tmp[8];
  if (m == NULL) return RPCPLUGIN_EUNSUPPORTED;
  if (err == NULL || errlen == 0) {
    err = tmp;
    errlen = sizeof tmp;
  }
  err[0] = '\0';
  return rp_mux_accept_knock(m, id, err, errlen);
}

static void mux_log(void *ud, int level, const char *msg) {
  rpcplugin_runtime *rt = ud;
  rp_runtime_log(rt, level, "%s", msg);
}

int rpcplugin_runtime_multiplex(rpcplugin_runtime *rt,
                                const rpcplugin_mux_options *o,
                                rpcplugin_error *err) {
  rpcplugin_mux_options mo;
  rp_mux *m = NULL, *none = NULL;
  int rc;
  if (rt == NULL || o == NULL || o->struct_size < offsetof(rpcplugin_mux_options, ud) + sizeof(void *)) {
    if (o && o->fd >= 0) close(o->fd);
    return rp_error(err, RPCPLUGIN_EINVAL, "multiplex: bad arguments");
  }
  if (!rp_runtime_started(rt) || atomic_load(&rt->mux) != NULL) {
    close(o->fd);
    return rp_error(err, RPCPLUGIN_ESTATE,
                    "multiplex: the runtime must be started, and multiplex "
                    "only once");
  }
  /* A caller built against an older header passes a shorter struct. */
  memset(&mo, 0, sizeof mo);
  memcpy(&mo, o, o->struct_size < sizeof mo ? o->struct_size : sizeof mo);
  mo.struct_size = sizeof mo;
  rc = rp_mux_start(&mo, rt_mux_knock, mux_log, rt, &m, err);
  if (rc != 0) {
    close(o->fd);
    return rc;
  }
  if (!atomic_compare_exchange_strong(&rt->mux, &none, m)) {
    rp_mux_free(m);
    return rp_error(err, RPCPLUGIN_ESTATE, "multiplex: already multiplexing");
  }
  /* Published first: the first stream may carry a knock at once, for a
   * route the host adds in on_ready (which needs rt->mux). */
  if (mo.on_ready != NULL) mo.on_ready(mo.ud);
  if ((rc = rp_mux_run(m, err)) != 0) return rc; /* freed at destroy */
  rp_runtime_log(rt, RPCPLUGIN_LOG_DEBUG,
                 "rpcplugin: multiplexing (yamux) on the client's connection");
  return 0;
}

int rpcplugin_runtime_multiplexed(rpcplugin_runtime *rt) {
  return rt && atomic_load(&rt->mux) != NULL;
}

int rpcplugin_runtime_mux_route(rpcplugin_runtime *rt, uint32_t id,
                                const char *network, const char *address) {
  rp_mux *m = rt ? atomic_load(&rt->mux) : NULL;
  if (m == NULL) return RPCPLUGIN_ESTATE;
  return rp_mux_route(m, id, network, address);
}

void rpcplugin_runtime_mux_go_away(rpcplugin_runtime *rt) {
  rp_mux *m = rt ? atomic_load(&rt->mux) : NULL;
  if (m) rp_mux_go_away(m);
}

void rpcplugin_runtime_mux_stop(rpcplugin_runtime *rt, int flush_ms) {
  rp_mux *m = rt ? atomic_load(&rt->mux) : NULL;
  if (m) rp_mux_stop(m, flush_ms);
}

int rpcplugin_runtime_mux_stats(rpcplugin_runtime *rt,
                                rpcplugin_mux_stats *out) {
  rp_mux *m = rt ? atomic_load(&rt->mux) : NULL;
  if (out == NULL) return RPCPLUGIN_EINVAL;
  if (m == NULL) return RPCPLUGIN_ESTATE;
  rp_mux_get_stats(m, out);
  return 0;
}

rp_mux *rp_runtime_mux(rpcplugin_runtime *rt) {
  return atomic_load(&rt->mux);
}

/* go-plugin's Dial for an application module: the client's advertisement
 * of id, from whichever loaded module serves the broker. */
static int host_broker_dial(void *host_ctx, uint32_t id, int timeout_ms,
                            grpc_channel **out, char *errbuf, size_t errlen) {
  rp_binding *b = host_ctx;
  rpcplugin_runtime *rt = b->rt;
  rpcplugin_conn_info info;
  int rc = RPCPLUGIN_EUNSUPPORTED;
  if (out == NULL) return RPCPLUGIN_EINVAL;
  *out = NULL;
  if (tls_poller != NULL) return RPCPLUGIN_EWRONGTHREAD;
  if (atomic_load(&rt->mux) != NULL) {
    /* Multiplexing: go-plugin's muxDial.  No advertisement comes (the
     * client's Accept only makes a listener); each connection the channel
     * makes becomes knock, ack, a new stream (mux.c). */
    rpcplugin_error e;
    char target[300];
    if (rt_broker_module(rt) == NULL) {
      if (errbuf && errlen)
        snprintf(errbuf, errlen, "broker dial of id %u: no loaded module "
                 "serves plugin.GRPCBroker", (unsigned)id);
      return RPCPLUGIN_EUNSUPPORTED;
    }
    rc = rp_mux_dial_target(atomic_load(&rt->mux), id, target, sizeof target,
                            &e);
    if (rc != 0) {
      if (errbuf && errlen)
        snprintf(errbuf, errlen, "broker dial of id %u: %s", (unsigned)id,
                 e.message);
      return rc;
    }
    *out = rp_client_channel("unix", target + 5, rt->tls_cert, rt->tls_key,
                             rt->tls_peer);
    if (*out == NULL) {
      if (errbuf && errlen)
        snprintf(errbuf, errlen, "broker dial of id %u: cannot create a "
                 "channel to %s", (unsigned)id, target);
      return RPCPLUGIN_EGRPC;
    }
    return 0;
  }
  {
    rpcplugin_module *bm = rt_broker_module(rt);
    if (bm) rc = rpcplugin_module_broker_wait_advertised(bm, id, timeout_ms, &info);
  }
  if (rc != 0) {
    if (errbuf && errlen)
      snprintf(errbuf, errlen, "broker dial of id %u: %s", (unsigned)id,
               rc == RPCPLUGIN_EUNSUPPORTED
                   ? "no loaded module serves plugin.GRPCBroker"
                   : rpcplugin_strerror(rc));
    return rc;
  }
  *out = rp_client_channel(info.network, info.address, rt->tls_cert,
                           rt->tls_key, rt->tls_peer);
  if (*out == NULL) {
    if (errbuf && errlen)
      snprintf(errbuf, errlen, "broker dial of id %u: cannot create a "
               "channel to %s %s", (unsigned)id, info.network, info.address);
    return RPCPLUGIN_EGRPC;
  }
  return 0;
}

static void host_broker_release(void *host_ctx, grpc_channel *ch) {
  (void)host_ctx;
  if (ch) grpc_channel_destroy(ch);
}

static int host_unary_call(void *host_ctx, grpc_channel *ch,
                           const char *method, const void *req,
                           size_t req_len, int timeout_ms, void *resp,
                           size_t resp_cap, size_t *resp_len, char *err,
                           size_t errlen) {
  (void)host_ctx;
  if (tls_poller != NULL) return RPCPLUGIN_EWRONGTHREAD;
  if (ch == NULL || method == NULL || (req == NULL && req_len > 0) ||
      (resp == NULL && resp_cap > 0))
    return RPCPLUGIN_EINVAL;
  return rp_unary_call(ch, method, req, req_len, timeout_ms, resp, resp_cap,
                       resp_len, err, errlen);
}

static void host_request_shutdown(void *host_ctx) {
  rp_binding *b = host_ctx;
  rpcplugin_runtime *rt = b->rt;
  if (atomic_exchange(&rt->shutdown_requested, 1) == 0 &&
      rt->opts.on_shutdown)
    rt->opts.on_shutdown(rt->opts.user_data);
}

static void host_log(void *host_ctx, int level, const char *msg) {
  rp_binding *b = host_ctx;
  rp_runtime_log(b->rt, level, "%s", msg);
}

static int host_on_poller_thread(void *host_ctx) {
  (void)host_ctx;
  return tls_poller != NULL;
}

/* ------------------------------------------------------------- relays */

static void relay_done(rpcplugin_tag *t, int ok) {
  rt_relay *r = (rt_relay *)t;
  rpcplugin_runtime *rt = r->rt;
  rpcplugin_tag *target;
  pthread_mutex_lock(&rt->relay_mu);
  target = r->target;
  if (target == NULL) {
    r->kept = 1;
    r->kept_ok = ok;
    pthread_mutex_unlock(&rt->relay_mu);
    return;
  }
  r->running++;
  pthread_mutex_unlock(&rt->relay_mu);
  target->on_done(target, ok);
  /* The target may have freed the relay meanwhile (relay_free from its own
   * callback): then it is freed here, once nothing runs through it. */
  pthread_mutex_lock(&rt->relay_mu);
  if (--r->running == 0) {
    pthread_cond_broadcast(&rt->relay_cv);
    if (r->kept == -1) {
      pthread_mutex_unlock(&rt->relay_mu);
      if (r->pub.recv_message) grpc_byte_buffer_destroy(r->pub.recv_message);
      free(r);
      return;
    }
  }
  pthread_mutex_unlock(&rt->relay_mu);
}

static rpcplugin_relay *host_relay_new(void *host_ctx, rpcplugin_tag *target) {
  rp_binding *b = host_ctx;
  rpcplugin_runtime *rt = b->rt;
  rt_relay *r = calloc(1, sizeof *r);
  if (r == NULL) return NULL;
  r->pub.tag.on_done = relay_done;
  r->rt = rt;
  r->target = target;
  pthread_mutex_lock(&rt->relay_mu);
  r->next = rt->relays;
  if (rt->relays) rt->relays->prev = r;
  rt->relays = r;
  pthread_mutex_unlock(&rt->relay_mu);
  return &r->pub;
}

static void host_relay_retarget(void *host_ctx, rpcplugin_relay *pub,
                                rpcplugin_tag *target) {
  rt_relay *r = (rt_relay *)pub;
  rpcplugin_runtime *rt = r->rt;
  int deliver = 0, ok = 0;
  (void)host_ctx;
  pthread_mutex_lock(&rt->relay_mu);
  if (target == NULL) {
    r->target = NULL;
    /* The old target's code must not be running when the caller goes on
     * (it may be unloaded next). */
    while (r->running > 0) pthread_cond_wait(&rt->relay_cv, &rt->relay_mu);
  } else {
    r->target = target;
    if (r->kept) {
      r->kept = 0;
      ok = r->kept_ok;
      deliver = 1;
      r->running++;
    }
  }
  pthread_mutex_unlock(&rt->relay_mu);
  if (deliver) {
    int gone = 0;
    target->on_done(target, ok);
    pthread_mutex_lock(&rt->relay_mu);
    if (--r->running == 0) {
      pthread_cond_broadcast(&rt->relay_cv);
      gone = r->kept == -1;
    }
    pthread_mutex_unlock(&rt->relay_mu);
    if (gone) {
      if (r->pub.recv_message) grpc_byte_buffer_destroy(r->pub.recv_message);
      free(r);
    }
  }
}

static void host_relay_free(void *host_ctx, rpcplugin_relay *pub) {
  rt_relay *r = (rt_relay *)pub;
  rpcplugin_runtime *rt;
  (void)host_ctx;
  if (r == NULL) return;
  rt = r->rt;
  pthread_mutex_lock(&rt->relay_mu);
  /* Freed from its own callback (the last batch of the call completed):
   * relay_done still touches r, and frees it when that callback returns. */
  if (r->prev) r->prev->next = r->next;
  else rt->relays = r->next;
  if (r->next) r->next->prev = r->prev;
  r->prev = r->next = NULL;
  r->target = NULL;
  if (r->running > 0) {
    r->kept = -1; /* freed by relay_done when its callback returns */
    pthread_mutex_unlock(&rt->relay_mu);
    return;
  }
  pthread_mutex_unlock(&rt->relay_mu);
  if (r->pub.recv_message) grpc_byte_buffer_destroy(r->pub.recv_message);
  free(r);
}

rp_binding *rp_runtime_bind(rpcplugin_runtime *rt, rpcplugin_module *mod) {
  rp_binding *b = calloc(1, sizeof *b);
  if (b == NULL) return NULL;
  b->rt = rt;
  b->mod = mod;
  rp_callset_init(&b->calls, log_to_runtime, rt);
  pthread_mutex_lock(&rt->mu);
  b->next = rt->bindings;
  rt->bindings = b;
  pthread_mutex_unlock(&rt->mu);
  return b;
}

void rp_runtime_fill_host_api(rp_binding *b, rpcplugin_host_api *api) {
  memset(api, 0, sizeof *api);
  api->abi_major = RPCPLUGIN_ABI_MAJOR;
  api->abi_minor = RPCPLUGIN_ABI_MINOR;
  api->struct_size = sizeof *api;
  api->host_ctx = b;
  api->server = b->rt->server;
  api->cq = b->rt->cq;
  api->add_method = host_add_method;
  api->request_shutdown = host_request_shutdown;
  api->log = host_log;
  api->on_poller_thread = host_on_poller_thread;
  api->add_call_method = host_add_call_method;
  api->tls_cert_pem = b->rt->tls_cert;
  api->tls_key_pem = b->rt->tls_key;
  api->tls_peer_cert_pem = b->rt->tls_peer;
  api->add_descriptors = host_add_descriptors;
  api->broker_dial = host_broker_dial;
  api->broker_release = host_broker_release;
  api->unary_call = host_unary_call;
  api->relay_new = host_relay_new;
  api->relay_retarget = host_relay_retarget;
  api->relay_free = host_relay_free;
  api->broker_mux_knock = host_broker_mux_knock;
#ifdef RPCPLUGIN_TEST_HOST_ABI_1_1
  /* Built only for the ABI matrix tests: a host of ABI 1.1, whose struct
   * ends before the relays. */
  api->abi_minor = 1;
  api->struct_size = offsetof(rpcplugin_host_api, relay_new);
  api->relay_new = NULL;
  api->relay_retarget = NULL;
  api->relay_free = NULL;
  api->broker_mux_knock = NULL;
#endif
}

int rp_runtime_on_poller(rpcplugin_runtime *rt) {
  (void)rt;
  return tls_poller != NULL;
}

int rp_runtime_stopping(rpcplugin_runtime *rt) {
  int s;
  pthread_mutex_lock(&rt->mu);
  s = rt->state >= RT_DRAINING;
  pthread_mutex_unlock(&rt->mu);
  return s;
}

int rp_runtime_file_loaded(rpcplugin_runtime *rt, dev_t dev, ino_t ino) {
  rt_mod_node *n;
  int found = 0;
  pthread_mutex_lock(&rt->mu);
  for (n = rt->modules; n && !found; n = n->next)
    found = rp_module_has_file(n->mod, dev, ino);
  pthread_mutex_unlock(&rt->mu);
  return found;
}

void rp_runtime_unroute(rp_binding *b) {
  rpcplugin_runtime *rt = b->rt;
  rt_method *m;
  pthread_mutex_lock(&rt->mu);
  for (m = rt->methods; m; m = m->next)
    if (m->owner == b) {
      m->owner = NULL;
      m->handler = NULL;
      m->handler_ctx = NULL;
    }
  while (b->inflight > 0) pthread_cond_wait(&rt->cv, &rt->mu);
  pthread_mutex_unlock(&rt->mu);
}

void rp_runtime_stage(rp_binding *b) { b->staged = 1; }

static void free_staged(rp_binding *b) {
  while (b->pending) {
    rt_staged *st = b->pending;
    b->pending = st->next;
    free(st);
  }
}

size_t rp_runtime_commit_routes(rp_binding *old, rp_binding *b) {
  rpcplugin_runtime *rt = b->rt;
  rt_method *m;
  rt_staged *st;
  size_t n = 0;
  pthread_mutex_lock(&rt->mu);
  if (old)
    for (m = rt->methods; m; m = m->next)
      if (m->owner == old) {
        m->owner = NULL;
        m->handler = NULL;
        m->handler_ctx = NULL;
      }
  for (st = b->pending; st; st = st->next) {
    st->m->owner = b;
    st->m->handler = st->handler;
    st->m->handler_ctx = st->handler_ctx;
    n++;
  }
  b->staged = 0;
  free_staged(b);
  /* Handlers already running in the old instance finish there. */
  while (old && old->inflight > 0) pthread_cond_wait(&rt->cv, &rt->mu);
  pthread_mutex_unlock(&rt->mu);
  return n;
}

void rp_runtime_unbind(rp_binding *b) {
  rpcplugin_runtime *rt = b->rt;
  rp_binding **pp;
  rp_runtime_unroute(b);
  pthread_mutex_lock(&rt->mu);
  for (pp = &rt->bindings; *pp; pp = &(*pp)->next)
    if (*pp == b) {
      *pp = b->next;
      break;
    }
  pthread_mutex_unlock(&rt->mu);
  /* Its calls are gone (rp_module_shut waited for them), or the module is
   * kept loaded (rp_module_free) and so is this. */
  rp_callset_destroy(&b->calls);
  free_app_routes(b->apps);
  free_staged(b);
  free(b);
}

void rp_runtime_cancel_calls(rp_binding *b) { rp_callset_cancel(&b->calls); }

size_t rp_runtime_wait_calls(rp_binding *b, long timeout_ms) {
  return rp_callset_wait(&b->calls, timeout_ms);
}

int rp_runtime_started(const rpcplugin_runtime *rt) {
  return rt->state == RT_STARTED;
}

void rp_runtime_add_module(rpcplugin_runtime *rt, rpcplugin_module *mod) {
  rt_mod_node *n = malloc(sizeof *n);
  if (n == NULL) return; /* the module is then unloaded only explicitly */
  n->mod = mod;
  pthread_mutex_lock(&rt->mu);
  n->next = rt->modules;
  rt->modules = n;
  pthread_mutex_unlock(&rt->mu);
}

void rp_runtime_remove_module(rpcplugin_runtime *rt, rpcplugin_module *mod) {
  rt_mod_node **pp;
  pthread_mutex_lock(&rt->mu);
  for (pp = &rt->modules; *pp; pp = &(*pp)->next)
    if ((*pp)->mod == mod) {
      rt_mod_node *n = *pp;
      *pp = n->next;
      free(n);
      break;
    }
  pthread_mutex_unlock(&rt->mu);
}

/* ---------------------------------------------------------- lifecycle */

int rpcplugin_runtime_create(const rpcplugin_runtime_options *opts,
                             rpcplugin_runtime **out, rpcplugin_error *err) {
  rpcplugin_runtime *rt;
  size_t n;
  rp_error_clear(err);
  if (out == NULL || opts == NULL || opts->server == NULL)
    return rp_error(err, RPCPLUGIN_EINVAL,
                    "rpcplugin_runtime_create: options with a server needed");
  *out = NULL;
  rt = calloc(1, sizeof *rt);
  if (rt == NULL) return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  n = opts->struct_size < sizeof rt->opts ? opts->struct_size
                                          : sizeof rt->opts;
  memcpy(&rt->opts, opts, n);
  rt->opts.struct_size = sizeof rt->opts;
  if (n < offsetof(rpcplugin_runtime_options, log_level) + sizeof(int))
    rt->opts.log_level = RPCPLUGIN_LOG_INFO;
  if (rt->opts.poll_threads == 0) rt->opts.poll_threads = 1;
  if (rt->opts.poll_threads > 64) rt->opts.poll_threads = 64;
  rt->server = opts->server;
  pthread_mutex_init(&rt->mu, NULL);
  rp_cond_init_monotonic(&rt->cv);
  pthread_mutex_init(&rt->relay_mu, NULL);
  pthread_cond_init(&rt->relay_cv, NULL);
  rt->shutdown_tag.on_done = shutdown_tag_done;
  rp_callset_init(&rt->host_calls, log_to_runtime, rt);
  /* The options' strings are the caller's: keep copies. */
  rt->opts.tls_cert_pem = rt->opts.tls_key_pem = rt->opts.tls_peer_cert_pem =
      NULL;
  if (n >= offsetof(rpcplugin_runtime_options, tls_peer_cert_pem) +
               sizeof(const char *) &&
      opts->tls_cert_pem && opts->tls_key_pem && opts->tls_peer_cert_pem) {
    rt->tls_cert = strdup(opts->tls_cert_pem);
    rt->tls_key = strdup(opts->tls_key_pem);
    rt->tls_peer = strdup(opts->tls_peer_cert_pem);
  }
  grpc_init();
  rt->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(rt->server, rt->cq, NULL);
  rt->state = RT_CREATED;
  *out = rt;
  return 0;
}

grpc_completion_queue *rpcplugin_runtime_cq(rpcplugin_runtime *rt) {
  return rt->cq;
}

int rpcplugin_runtime_start(rpcplugin_runtime *rt, rpcplugin_error *err) {
  rt_method *m;
  size_t n = REQUESTS_GENERIC, i = 0, j;
  unsigned p;
  rt_mod_node *node;

  rp_error_clear(err);
  pthread_mutex_lock(&rt->mu);
  if (rt->state != RT_CREATED) {
    pthread_mutex_unlock(&rt->mu);
    return rp_error(err, RPCPLUGIN_ESTATE, "runtime already started");
  }
  for (m = rt->methods; m; m = m->next) n += REQUESTS_PER_METHOD;
  rt->requests = calloc(n, sizeof *rt->requests);
  rt->pollers = calloc(rt->opts.poll_threads, sizeof *rt->pollers);
  if (rt->poller_seq == NULL)
    rt->poller_seq = calloc(rt->opts.poll_threads, sizeof *rt->poller_seq);
  if (rt->requests == NULL || rt->pollers == NULL) {
    pthread_mutex_unlock(&rt->mu);
    return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
  }
  for (m = rt->methods; m; m = m->next)
    for (j = 0; j < REQUESTS_PER_METHOD; j++) rt->requests[i++].m = m;
  for (; i < n; i++) rt->requests[i].m = NULL;
  rt->nrequests = n;
  rt->outstanding = n;
  rt->state = RT_STARTED;
  pthread_mutex_unlock(&rt->mu);

  for (i = 0; i < n; i++) {
    rt_request *r = &rt->requests[i];
    r->tag.on_done = request_done;
    r->rt = rt;
    grpc_metadata_array_init(&r->md);
    grpc_call_details_init(&r->details);
  }
  for (p = 0; p < rt->opts.poll_threads; p++) {
    if (pthread_create(&rt->pollers[p], NULL, poller_main, rt) != 0) break;
    rt->npollers++;
  }
  if (rt->npollers == 0) {
    /* Nothing polls the queue: undo, so that shutdown does not wait. */
    pthread_mutex_lock(&rt->mu);
    rt->state = RT_CREATED;
    rt->outstanding = 0;
    pthread_mutex_unlock(&rt->mu);
    return rp_error(err, RPCPLUGIN_ENOMEM, "cannot start a poller thread");
  }
  for (i = 0; i < n; i++) issue_request(&rt->requests[i]);

  /* Start the modules loaded before the server started (outside the lock:
   * start may take the module's own locks). */
  {
    size_t count = 0, k;
    rpcplugin_module **mods;
    pthread_mutex_lock(&rt->mu);
    for (node = rt->modules; node; node = node->next) count++;
    mods = calloc(count ? count : 1, sizeof *mods);
    for (k = 0, node = rt->modules; mods && node; node = node->next)
      mods[k++] = node->mod;
    pthread_mutex_unlock(&rt->mu);
    if (mods == NULL) return rp_error(err, RPCPLUGIN_ENOMEM, "out of memory");
    for (k = 0; k < count; k++) rp_module_start(mods[k]);
    free(mods);
  }
  return 0;
}

/* Debug log: how long a shutdown step took (since t0, CLOCK_MONOTONIC). */
static void trace_step(rpcplugin_runtime *rt, const struct timespec *t0,
                       const char *what) {
  struct timespec now;
  if (rt->opts.log == NULL || rt->opts.log_level < RPCPLUGIN_LOG_DEBUG) return;
  clock_gettime(CLOCK_MONOTONIC, &now);
  rp_runtime_log(rt, RPCPLUGIN_LOG_DEBUG, "rpcplugin: shutdown: %s after %.3f ms",
                 what,
                 (double)(now.tv_sec - t0->tv_sec) * 1e3 +
                     (double)(now.tv_nsec - t0->tv_nsec) / 1e6);
}

/* Bytes that this process wrote to its connected stream sockets and that
 * their peers have not read yet (unix sockets) or not acknowledged (tcp),
 * summed over every such socket: SIOCOUTQ, which for a unix socket counts
 * what sits unread in the peer's receive queue.  Listening sockets and
 * other descriptors are skipped; 0 when /proc/self/fd cannot be read.
 * *nconnected: how many such sockets there are (-1: unknown). */
static long rp_unread_outgoing_bytes(int *nconnected) {
  DIR *d = opendir("/proc/self/fd");
  struct dirent *e;
  long total = 0;
  *nconnected = -1; /* unknown */
  if (d == NULL) return 0;
  *nconnected = 0;
  while ((e = readdir(d)) != NULL) {
    struct stat st;
    int fd, listening = 0, type = 0, outq = 0;
    socklen_t len;
    char *end;
    long v = strtol(e->d_name, &end, 10);
    if (*e->d_name == '\0' || *end != '\0' || v < 0 || v == dirfd(d))
      continue;
    fd = (int)v;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    len = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 ||
        type != SOCK_STREAM)
      continue;
    len = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 ||
        listening)
      continue;
    (*nconnected)++;
    if (ioctl(fd, SIOCOUTQ, &outq) == 0 && outq > 0) total += outq;
  }
  closedir(d);
  return total;
}

static long rp_ms_between(const struct timespec *a, const struct timespec *b) {
  return (long)(b->tv_sec - a->tv_sec) * 1000 +
         (b->tv_nsec - a->tv_nsec) / 1000000;
}

static int rp_timespec_before(const struct timespec *a,
                              const struct timespec *b) {
  return a->tv_sec < b->tv_sec ||
         (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

int rpcplugin_runtime_drain(rpcplugin_runtime *rt) {
  int was_started;
  if (rt == NULL) return RPCPLUGIN_EINVAL;
  if (tls_poller != NULL) return RPCPLUGIN_EWRONGTHREAD;

  pthread_mutex_lock(&rt->mu);
  if (rt->state >= RT_DRAINING) {
    /* Another thread drains (or drained, or shuts down): wait for it. */
    while (rt->state == RT_DRAINING) pthread_cond_wait(&rt->cv, &rt->mu);
    pthread_mutex_unlock(&rt->mu);
    return 0;
  }
  was_started = rt->state == RT_STARTED;
  rt->was_started = was_started;
  rt->state = RT_DRAINING;
  pthread_mutex_unlock(&rt->mu);
  clock_gettime(CLOCK_MONOTONIC, &rt->t_stop);
  /* Multiplexing: yamux GO_AWAY, the client opens no new stream (the
   * streams open go on). */
  if (atomic_load(&rt->mux)) rp_mux_go_away(atomic_load(&rt->mux));

  /* 1. From here on (state RT_DRAINING) calls that arrive are answered
   * UNAVAILABLE "plugin is shutting down" by the modules and the runtime.
   * The server itself is shut down (GOAWAY) only after the clients read
   * what the streams sent (step 3): the C core closes a connection as soon
   * as its last stream ends after a GOAWAY, and a client that then writes
   * a window update for data it is still reading fails that stream with
   * "Broken pipe", its last messages and status unread. */

  /* 2. Modules: streams flush and finish, everything else is cancelled.
   * They stay loaded (put_line now answers RPCPLUGIN_ESHUTDOWN) until
   * rpcplugin_runtime_destroy, so host threads still inside put_line wake
   * up safely. */
  {
    rt_mod_node *n;
    for (;;) {
      rpcplugin_module *mod = NULL;
      pthread_mutex_lock(&rt->mu);
      for (n = rt->modules; n; n = n->next)
        if (!rp_module_is_shut(n->mod)) {
          mod = n->mod;
          break;
        }
      pthread_mutex_unlock(&rt->mu);
      if (mod == NULL) break;
      rp_module_shut(mod);
    }
  }
  /* The host's own application calls: cancelled, and the host's handlers
   * finish them (on_cancel); bounded, a handler that never does is only
   * reported. */
  rp_callset_cancel(&rt->host_calls);
  if (rp_callset_wait(&rt->host_calls, RT_CALLS_WAIT_MS) > 0)
    rp_runtime_log(rt, RPCPLUGIN_LOG_ERROR,
                   "rpcplugin: %zu application calls of the host were not "
                   "finished %d ms after they were cancelled",
                   rp_callset_count(&rt->host_calls), RT_CALLS_WAIT_MS);
  trace_step(rt, &rt->t_stop, "modules stopped");

  /* 3. Let the clients read what was sent before the server goes away.
   * The C core completes a call's status batch once the status is
   * encoded, before the bytes are written, and a client that writes
   * anything (a window update, a ping ack) to a connection the server has
   * already closed fails all its calls, even those whose data sits unread
   * in its socket: cutting at once lost the Shutdown reply, or a stream's
   * last messages and status, now and then.  So wait until the process
   * has no connected stream socket left (go-plugin clients close right
   * after Shutdown), until none holds bytes its peer has not read yet (for
   * RT_QUIET_LOOKS looks 2 ms apart), or until those bytes stopped going
   * down for RT_STALL_MS
   * (nobody reads them: a stuck client), at most close_grace_ms (a slow
   * client still reading a stream's last window). */
  if (was_started && rt->npollers && rt->opts.close_grace_ms >= 0) {
    struct timespec until, step, progress;
    long last = -1;
    int quiet = 0, timed_out = 0, stalled = 0, nconn = -1;
    rp_deadline_after_ms(&until, rt->opts.close_grace_ms
                                     ? rt->opts.close_grace_ms
                                     : RPCPLUGIN_CLOSE_GRACE_MS);
    rp_deadline_after_ms(&progress, 0);
    pthread_mutex_lock(&rt->mu);
    while (quiet < RT_QUIET_LOOKS && !timed_out && !stalled) {
      long unread;
      struct timespec now;
      pthread_mutex_unlock(&rt->mu);
      unread = rp_unread_outgoing_bytes(&nconn);
      if (nconn == 0) { /* every client closed (go-plugin's do at once) */
        pthread_mutex_lock(&rt->mu);
        break;
      }
      rp_deadline_after_ms(&now, 0);
      quiet = unread == 0 ? quiet + 1 : 0;
      if (last < 0 || unread < last) {
        progress = now; /* the clients read (the modules write no more) */
      } else if (rp_ms_between(&progress, &now) >= RT_STALL_MS) {
        stalled = 1; /* nobody reads: an idle client, or a stuck one */
      }
      last = unread;
      pthread_mutex_lock(&rt->mu);
      rp_deadline_after_ms(&step, 2);
      if (rp_timespec_before(&until, &step)) step = until;
      if (!stalled &&
          pthread_cond_timedwait(&rt->cv, &rt->mu, &step) == ETIMEDOUT &&
          !rp_timespec_before(&step, &until))
        timed_out = 1;
    }
    pthread_mutex_unlock(&rt->mu);
    trace_step(rt, &rt->t_stop,
               nconn == 0 ? "connections closed"
               : quiet >= RT_QUIET_LOOKS ? "clients read everything"
               : stalled       ? "clients stopped reading"
                               : "clients still reading after the grace");
  }
  /* 4. Now stop: GOAWAY; connections close as their calls end.  Also for a
   * server that never started: gRPC refuses to destroy a server with
   * listeners that was not shut down. */
  RP_TSAN_RELEASE(&rt->shutdown_tag);
  grpc_server_shutdown_and_notify(rt->server, rt->cq, &rt->shutdown_tag);
  /* Multiplexing: forward what the bridges still hold, then close the
   * client's connection (the local connections end with it). */
  if (atomic_load(&rt->mux)) rp_mux_stop(atomic_load(&rt->mux), 200);

  pthread_mutex_lock(&rt->mu);
  rt->state = RT_DRAINED;
  pthread_cond_broadcast(&rt->cv);
  pthread_mutex_unlock(&rt->mu);
  return 0;
}

int rpcplugin_runtime_shutdown(rpcplugin_runtime *rt) {
  unsigned p;
  int rc;
  if (rt == NULL) return RPCPLUGIN_EINVAL;
  if (tls_poller != NULL) return RPCPLUGIN_EWRONGTHREAD;
  if ((rc = rpcplugin_runtime_drain(rt)) != 0) return rc;

  pthread_mutex_lock(&rt->mu);
  if (rt->state != RT_DRAINED) {
    while (rt->state != RT_STOPPED) pthread_cond_wait(&rt->cv, &rt->mu);
    pthread_mutex_unlock(&rt->mu);
    return 0;
  }
  rt->state = RT_STOPPING;
  pthread_mutex_unlock(&rt->mu);

  /* 4. Whatever is left: the host's own calls, rejections, connections
   * still open. */
  grpc_server_cancel_all_calls(rt->server);
  if (rt->was_started) {
    pthread_mutex_lock(&rt->mu);
    while (!rt->server_down || rt->outstanding > 0)
      pthread_cond_wait(&rt->cv, &rt->mu);
    pthread_mutex_unlock(&rt->mu);
    trace_step(rt, &rt->t_stop, "server down");
  }

  /* 5. Drain the queue to GRPC_QUEUE_SHUTDOWN and join the pollers. */
  grpc_completion_queue_shutdown(rt->cq);
  if (rt->npollers) {
    for (p = 0; p < rt->npollers; p++) pthread_join(rt->pollers[p], NULL);
  } else {
    for (;;) {
      grpc_event ev = grpc_completion_queue_next(
          rt->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
      if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
      if (ev.type == GRPC_OP_COMPLETE) {
        rpcplugin_tag *t = ev.tag;
        RP_TSAN_ACQUIRE(t);
        t->on_done(t, ev.success);
      }
    }
  }

  trace_step(rt, &rt->t_stop, "pollers joined");
  pthread_mutex_lock(&rt->mu);
  rt->state = RT_STOPPED;
  pthread_cond_broadcast(&rt->cv);
  pthread_mutex_unlock(&rt->mu);
  return 0;
}

void rpcplugin_runtime_destroy(rpcplugin_runtime *rt) {
  rt_method *m;
  size_t i;
  if (rt == NULL) return;
  rpcplugin_runtime_shutdown(rt);
  for (;;) {
    rpcplugin_module *mod = NULL;
    pthread_mutex_lock(&rt->mu);
    if (rt->modules) {
      rt_mod_node *n = rt->modules;
      mod = n->mod;
      rt->modules = n->next;
      free(n);
    }
    pthread_mutex_unlock(&rt->mu);
    if (mod == NULL) break;
    rp_module_free(mod);
  }
  /* A binding whose module was kept loaded (its application calls outlived
   * its shutdown) stays, with its call set: a late finish still finds it. */
  {
    rp_binding **pp = &rt->bindings;
    while (*pp) {
      rp_binding *b = *pp;
      if (rp_callset_count(&b->calls) > 0) {
        pp = &b->next;
        continue;
      }
      rp_runtime_unbind(b); /* unlinks b */
    }
  }
  for (i = 0; i < rt->nrequests; i++) {
    grpc_metadata_array_destroy(&rt->requests[i].md);
    grpc_call_details_destroy(&rt->requests[i].details);
  }
  free(rt->requests);
  free(rt->pollers);
  free((void *)rt->poller_seq);
  while ((m = rt->methods) != NULL) {
    rt->methods = m->next;
    free(m->path);
    free(m);
  }
  free_app_routes(rt->host_apps);
  rp_callset_destroy(&rt->host_calls);
  for (i = 0; i < rt->ndesc; i++) free(rt->desc[i]);
  free(rt->desc);
  free(rt->desc_len);
  rp_mux_free(atomic_load(&rt->mux));
  free(rt->tls_cert);
  free(rt->tls_key);
  free(rt->tls_peer);
  /* Relays nobody freed (a module that leaked them): no batch is pending
   * any more, so they can go. */
  while (rt->relays) {
    rt_relay *r = rt->relays;
    rt->relays = r->next;
    if (r->pub.recv_message) grpc_byte_buffer_destroy(r->pub.recv_message);
    free(r);
  }
  pthread_cond_destroy(&rt->relay_cv);
  pthread_mutex_destroy(&rt->relay_mu);
  grpc_completion_queue_destroy(rt->cq);
  pthread_cond_destroy(&rt->cv);
  pthread_mutex_destroy(&rt->mu);
  free(rt);
  grpc_shutdown();
}
