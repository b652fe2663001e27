/*
 * broker.c - plugin.GRPCBroker/StartStream: real subchannels, go-plugin's
 * plain brokering, and the broker entries of the host API.
 *
 * Each received ConnInfo is handled in order (docs/wire.md, the broker table):
 *   knock{knock, !ack}  open subchannel service_id to network/address: a
 *                       gRPC channel that must reach READY within
 *                       connect_timeout_ms; reply knock{knock, ack} or
 *                       knock{ack: false, error};
 *   knock{!knock, !ack} close it; reply ack, or "not found";
 *   knock{ack} or knock{error}
 *                       the peer's answer to a knock of ours: handed to the
 *                       host waiting in broker_knock, never answered (two
 *                       brokers must not answer each other's answers);
 *   no knock, address   the peer's advertisement (go-plugin's Accept):
 *                       recorded for broker_wait_advertised, no reply;
 *   anything else       an error reply; the stream goes on.
 * Only "unix" with an absolute path and "tcp" with a literal loopback
 * address (any literal address with allow_non_loopback) are accepted;
 * everything is validated before any connection attempt, and no name is
 * ever resolved.
 *
 * Each stream handles its messages strictly one after another: a knock
 * waiting for READY holds back the later messages of its own stream (they
 * wait, received, in an input queue), so every message sees the effect of
 * the ones before it (a close right behind a knock closes the subchannel
 * the knock opened) and replies leave in request order.  Other streams are
 * never stalled.  Both queues of a stream are bounded: with
 * max_pending_per_stream messages received and not yet answered, a further
 * message is refused with an error reply (in its turn), and at twice that
 * the stream stops reading until it drains, so HTTP/2 flow control pushes
 * back on the peer.
 *
 * Subchannels use insecure credentials, or, when the host gives AutoMTLS
 * material (host API 1.1 tls_*), TLS that presents the plugin's
 * certificate, trusts only the client's and expects the name "localhost";
 * a peer that does not pass fails to reach READY like any other failed
 * connect, and the knock gets an error reply.
 *
 * Subchannels belong to the broker, not to a stream, and are closed at
 * shutdown.  A channel lent to the host (broker_channel) is destroyed only
 * when it is both closed and returned.
 *
 * Lock: b->mu guards everything here.  gRPC calls made under it never
 * complete inline (completions go through the queue); sends and finishes
 * are started after unlocking.
 */
#include "broker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "codec.h"
#include "engine.h"
#include "monotime.h"
#include "grpc_broker.pb-c.h"
#include "rp_trim.h"
#include "rp_tsan.h"

#define NBUCKETS 256
#define MAX_ADVERTS 1024

typedef struct bstream bstream;
typedef struct bitem bitem;
typedef struct sub sub;

/* One reply (or host message) waiting in a stream's queue. */
struct bitem {
  bitem *next;           /* stream queue */
  bitem *wnext;          /* waiters of a connecting subchannel */
  bstream *st;           /* NULL once the stream is gone (orphan) */
  grpc_byte_buffer *bb;  /* NULL until the reply is known */
  uint32_t id;
};

/* A received message waiting for its turn (or a refusal, kept in order). */
typedef struct inmsg {
  struct inmsg *next;
  Plugin__ConnInfo *m; /* NULL: refuse with `why` */
  uint32_t id;
  const char *why;
} inmsg;

struct bstream {
  rp_call *c;
  bstream *prev, *next;
  bitem *head, *tail; /* replies, in request order */
  size_t nitems;
  inmsg *in_head, *in_tail; /* received, not yet handled */
  size_t nin;
  int waiting; /* a knock of this stream waits for READY */
  int sending, paused, half_closed, closed, finishing, finished;
};

enum { SUB_CONNECTING, SUB_OPEN, SUB_CLOSED };

typedef struct watch_tag {
  rpcplugin_tag tag;
  sub *s;
} watch_tag;

struct sub {
  rp_broker *b;
  uint32_t id;
  char network[16];
  char address[256];
  grpc_channel *ch; /* NULL once destroyed */
  int state;
  int watching;
  int borrowers;
  gpr_timespec deadline;
  watch_tag watch;
  bitem *waiting;
  sub *next; /* hash bucket, or the closed list */
};

typedef struct advert {
  rpcplugin_conn_info info;
  struct advert *next;
} advert;

typedef struct knock_waiter {
  uint32_t id;
  int done, ack;
  char error[256];
  struct knock_waiter *next;
} knock_waiter;

struct rp_broker {
  rp_instance *inst;
  /* One set for every subchannel: insecure, or with AutoMTLS TLS that
   * presents our certificate, trusts only the client's and expects the
   * name "localhost".  Arguments: a private subchannel pool (closing one
   * subchannel never disturbs another to the same address, and each has a
   * connection of its own), and with TLS the target name. */
  grpc_channel_credentials *creds;
  int tls;
  grpc_arg arg[2];
  grpc_channel_args args;
  pthread_mutex_t mu;
  pthread_cond_t cv; /* CLOCK_MONOTONIC */
  sub *table[NBUCKETS];
  sub *closed; /* closed but still lent or watched */
  size_t nsubs;
  size_t nwatching;
  bstream *streams;
  size_t nstreams;
  rp_trim trim; /* memory back after a flood of streams */
  advert *adverts; /* newest first */
  size_t nadverts;
  knock_waiter *waiters;
  int stopping;
  int handing; /* a swap: host entries go to the new instance */
  int nhost;   /* host entries between unlocking and their last send */
  uint64_t messages_in, messages_out, errors;
};

/* Deferred work: sends and finishes start after the lock is released. */
typedef struct action {
  bstream *st;
  grpc_byte_buffer *bb;
  int finish;
  int recv;
} action;

/* Zero-initialised; the first few actions live inline (no allocation on
 * the per-message path). */
typedef struct actions {
  action *v;
  size_t n, cap;
  action inl[4];
} actions;

static void send_done(rp_call *c, int ok);
static void finish_done(rp_call *c, int ok);
static void recv_done(rp_call *c, int ok);

/* ------------------------------------------------------------ helpers */

static grpc_byte_buffer *conninfo(uint32_t id, const char *network,
                                  const char *address, int with_knock,
                                  int knock, int ack, const char *error) {
  Plugin__ConnInfo m = PLUGIN__CONN_INFO__INIT;
  Plugin__ConnInfo__Knock k = PLUGIN__CONN_INFO__KNOCK__INIT;
  m.service_id = id;
  m.network = (char *)(network ? network : "");
  m.address = (char *)(address ? address : "");
  if (with_knock) {
    k.knock = knock;
    k.ack = ack;
    k.error = (char *)(error ? error : "");
    m.knock = &k;
  }
  return rp_encode(&m.base);
}

static grpc_byte_buffer *error_reply(rp_broker *b, uint32_t id,
                                     const char *why) {
  b->errors++;
  return conninfo(id, NULL, NULL, 1, 0, 0, why);
}

static void actions_add(actions *a, bstream *st, grpc_byte_buffer *bb,
                        int finish, int recv) {
  if (a->v == NULL) {
    a->v = a->inl;
    a->cap = sizeof a->inl / sizeof a->inl[0];
  }
  if (a->n == a->cap) {
    size_t cap = a->cap * 2;
    action *v = a->v == a->inl ? malloc(cap * sizeof *v)
                               : realloc(a->v, cap * sizeof *v);
    if (v == NULL) { /* cannot defer: drop the message, keep going */
      if (bb) grpc_byte_buffer_destroy(bb);
      return;
    }
    if (a->v == a->inl) memcpy(v, a->inl, sizeof a->inl);
    a->v = v;
    a->cap = cap;
  }
  rp_call_ref(st->c);
  a->v[a->n].st = st;
  a->v[a->n].bb = bb;
  a->v[a->n].finish = finish;
  a->v[a->n].recv = recv;
  a->n++;
}

/* ------------------------------------------------------------ streams */

/* Off the broker's list, once (closed marks it). */
static void stream_unlink_locked(rp_broker *b, bstream *st) {
  st->closed = 1;
  if (st->prev)
    st->prev->next = st->next;
  else if (b->streams == st)
    b->streams = st->next;
  if (st->next) st->next->prev = st->prev;
  st->prev = st->next = NULL;
  b->nstreams--;
}

static void item_push(bstream *st, bitem *it) {
  it->st = st;
  it->next = NULL;
  if (st->tail)
    st->tail->next = it;
  else
    st->head = it;
  st->tail = it;
  st->nitems++;
}

static int queue_ready(rp_broker *b, bstream *st, grpc_byte_buffer *bb,
                       uint32_t id) {
  bitem *it = calloc(1, sizeof *it);
  (void)b;
  if (it == NULL) {
    grpc_byte_buffer_destroy(bb);
    return -1;
  }
  it->bb = bb;
  it->id = id;
  item_push(st, it);
  return 0;
}

/* Decide what st does next (under b->mu) and record it in a. */
static void pump_locked(rp_broker *b, bstream *st, actions *a) {
  const rp_config *cfg = &b->inst->cfg;
  if (st->closed || st->finishing) return;
  if (!st->sending) {
    if (st->head && st->head->bb) {
      bitem *it = st->head;
      grpc_byte_buffer *bb = it->bb;
      st->head = it->next;
      if (st->head == NULL) st->tail = NULL;
      st->nitems--;
      free(it);
      st->sending = 1;
      actions_add(a, st, bb, 0, 0);
    } else if (st->head == NULL && st->in_head == NULL &&
               (st->half_closed || b->stopping)) {
      st->finishing = 1;
      actions_add(a, st, NULL, 1, 0);
      return;
    }
  }
  if (st->paused && !st->half_closed && !b->stopping &&
      st->nitems + st->nin < cfg->broker.max_pending_per_stream) {
    st->paused = 0;
    actions_add(a, st, NULL, 0, 1);
  }
}

static void run_actions(rp_broker *b, actions *a) {
  size_t i;
  for (i = 0; i < a->n; i++) {
    action *x = &a->v[i];
    bstream *st = x->st;
    if (x->bb) {
      if (rp_call_send(st->c, x->bb, 0, send_done) != 0) {
        grpc_byte_buffer_destroy(x->bb);
        pthread_mutex_lock(&b->mu);
        st->sending = 0;
        pthread_mutex_unlock(&b->mu);
      }
    }
    if (x->finish &&
        rp_call_finish(st->c, GRPC_STATUS_OK, NULL, NULL, 0, finish_done) !=
            0) {
      pthread_mutex_lock(&b->mu);
      st->finished = 1;
      pthread_cond_broadcast(&b->cv);
      pthread_mutex_unlock(&b->mu);
    }
    if (x->recv && rp_call_recv(st->c, recv_done) != 0) {
      pthread_mutex_lock(&b->mu);
      st->half_closed = 1;
      pthread_mutex_unlock(&b->mu);
    }
    rp_call_unref(st->c);
  }
  if (a->v != a->inl) free(a->v);
  a->v = NULL;
  a->n = a->cap = 0;
}

/* --------------------------------------------------------- subchannels */

static sub **bucket(rp_broker *b, uint32_t id) {
  return &b->table[id % NBUCKETS];
}

static sub *find_sub(rp_broker *b, uint32_t id) {
  sub *s;
  for (s = *bucket(b, id); s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

static void unlink_sub(rp_broker *b, sub *s) {
  sub **pp;
  for (pp = bucket(b, s->id); *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      b->nsubs--;
      return;
    }
}

static void free_sub_if_done(rp_broker *b, sub *s) {
  sub **pp;
  if (s->state != SUB_CLOSED || s->watching || s->ch) return;
  for (pp = &b->closed; *pp; pp = &(*pp)->next)
    if (*pp == s) {
      *pp = s->next;
      break;
    }
  free(s);
}

static void process_locked(rp_broker *b, bstream *st, actions *a);

/* Resolve every reply waiting for s's connect; their streams go on with
 * the messages that waited behind them.  Every reply is made first, while
 * s is sure to exist: a stream that goes on may close s (a close right
 * behind its knock), which frees it when no other stream waits on it.  A
 * stream waits on one knock at most, so going on with one stream never
 * touches another's item. */
static void resolve_waiters(rp_broker *b, sub *s, int ok, const char *why,
                            actions *a) {
  bitem *list = s->waiting, *it, *next, **pp;
  s->waiting = NULL;
  for (pp = &list; (it = *pp) != NULL;) {
    if (ok)
      it->bb = conninfo(s->id, NULL, NULL, 1, 1, 1, NULL);
    else
      it->bb = error_reply(b, s->id, why);
    if (it->st == NULL) { /* its stream is gone */
      *pp = it->wnext;
      grpc_byte_buffer_destroy(it->bb);
      free(it);
      continue;
    }
    pp = &it->wnext;
  }
  for (it = list; it; it = next) {
    bstream *st = it->st;
    next = it->wnext; /* it may be sent and freed below */
    st->waiting = 0;
    process_locked(b, st, a);
    pump_locked(b, st, a);
  }
}

/* Close s (under b->mu): out of the table; its channel is destroyed now
 * unless the host borrowed it. */
static void watch(rp_broker *b, sub *s, grpc_connectivity_state last);

static void close_sub(rp_broker *b, sub *s, const char *why, actions *a) {
  int connecting = s->state == SUB_CONNECTING;
  unlink_sub(b, s);
  s->state = SUB_CLOSED;
  resolve_waiters(b, s, 0, why, a);
  if (s->ch && connecting && s->borrowers == 0 && !b->stopping) {
    /* gRPC 1.51 orphans a connection that completes after its channel was
     * destroyed (its descriptor and the peer's connection stay open): let
     * the attempt end first (gRPC's own connect timeout ends it), then
     * destroy the channel (watch_done). */
    if (!s->watching) {
      s->deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                 gpr_time_from_millis(30000, GPR_TIMESPAN));
      watch(b, s, GRPC_CHANNEL_CONNECTING);
    }
    s->next = b->closed;
    b->closed = s;
    return;
  }
  if (s->ch && (s->borrowers == 0 || b->stopping)) {
    if (s->borrowers)
      rp_log(b->inst, RPCPLUGIN_LOG_WARN,
             "rpcplugin: broker: subchannel %u still lent to the host at "
             "shutdown",
             (unsigned)s->id);
    grpc_channel_destroy(s->ch);
    s->ch = NULL;
  }
  s->next = b->closed;
  b->closed = s;
  free_sub_if_done(b, s);
}

static void watch_done(rpcplugin_tag *t, int ok);

static void watch(rp_broker *b, sub *s, grpc_connectivity_state last) {
  s->watching = 1;
  b->nwatching++;
  RP_TSAN_RELEASE(&s->watch.tag);
  grpc_channel_watch_connectivity_state(s->ch, last, s->deadline,
                                        b->inst->host.cq, &s->watch.tag);
}

static void watch_done(rpcplugin_tag *t, int ok) {
  sub *s = ((watch_tag *)t)->s;
  rp_broker *b = s->b;
  actions a = {0};
  char why[512];
  pthread_mutex_lock(&b->mu);
  s->watching = 0;
  b->nwatching--;
  if (s->state == SUB_CONNECTING) {
    grpc_connectivity_state st =
        s->ch ? grpc_channel_check_connectivity_state(s->ch, 0)
              : GRPC_CHANNEL_SHUTDOWN;
    if (st == GRPC_CHANNEL_READY) {
      s->state = SUB_OPEN;
      resolve_waiters(b, s, 1, NULL, &a);
    } else if (!ok) {
      snprintf(why, sizeof why,
               "subchannel %u: %s %s not ready within %ld ms%s",
               (unsigned)s->id, s->network, s->address,
               b->inst->cfg.broker.connect_timeout_ms,
               b->tls ? " (TLS: AutoMTLS is on)" : "");
      close_sub(b, s, why, &a);
    } else if (st == GRPC_CHANNEL_TRANSIENT_FAILURE ||
               st == GRPC_CHANNEL_SHUTDOWN) {
      snprintf(why, sizeof why, "subchannel %u: cannot connect to %s %s%s",
               (unsigned)s->id, s->network, s->address,
               b->tls ? " with TLS (AutoMTLS is on: the peer must listen "
                        "and serve TLS with the client's certificate, for "
                        "localhost)"
                      : "");
      close_sub(b, s, why, &a);
    } else {
      if (st == GRPC_CHANNEL_IDLE)
        st = grpc_channel_check_connectivity_state(s->ch, 1);
      watch(b, s, st);
    }
  } else {
    if (s->state == SUB_CLOSED && s->ch && s->borrowers == 0) {
      grpc_connectivity_state st = grpc_channel_check_connectivity_state(s->ch, 0);
      if (ok && !b->stopping && st == GRPC_CHANNEL_CONNECTING) {
        watch(b, s, st);
      } else {
        grpc_channel_destroy(s->ch);
        s->ch = NULL;
      }
    }
    free_sub_if_done(b, s);
  }
  if (b->nwatching == 0) pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);
}

/* ------------------------------------------------------- validation */

/* Check network/address; on success fill the gRPC target.  Returns NULL,
 * or why it is refused. */
static const char *check_address(const rp_config *cfg, const char *network,
                                 const char *address, char *target,
                                 size_t tlen, char *why, size_t wlen) {
  if (strcmp(network, "unix") == 0) {
    if (!cfg->broker.allow_unix) return "network \"unix\" is not allowed";
    if (address[0] != '/') return "unix address must be an absolute path";
    if (strlen(address) > 107)
      return "unix address too long (at most 107 bytes)";
    snprintf(target, tlen, "unix:%s", address);
    return NULL;
  }
  if (strcmp(network, "tcp") == 0) {
    char host[64];
    const char *colon, *hs, *he;
    char *end;
    long port;
    int v6 = 0;
    unsigned char addr[16];
    if (!cfg->broker.allow_tcp) return "network \"tcp\" is not allowed";
    if (address[0] == '[') {
      hs = address + 1;
      he = strchr(hs, ']');
      if (he == NULL || he[1] != ':') return "tcp address must be HOST:PORT";
      colon = he + 1;
      v6 = 1;
    } else {
      hs = address;
      colon = strrchr(address, ':');
      if (colon == NULL) return "tcp address must be HOST:PORT";
      he = colon;
    }
    if ((size_t)(he - hs) >= sizeof host || he == hs)
      return "tcp address has a bad host";
    memcpy(host, hs, (size_t)(he - hs));
    host[he - hs] = '\0';
    errno = 0;
    port = strtol(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end != '\0' || errno || port < 1 ||
        port > 65535)
      return "tcp address has a bad port (1-65535)";
    if (!v6 && strcmp(host, "localhost") == 0) strcpy(host, "127.0.0.1");
    if (v6 ? inet_pton(AF_INET6, host, addr) != 1
           : inet_pton(AF_INET, host, addr) != 1)
      return "tcp host must be a literal IP address (names are not "
             "resolved)";
    if (!cfg->broker.allow_non_loopback) {
      static const unsigned char lo6[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                            0, 0, 0, 0, 0, 0, 0, 1};
      static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0,
                                               0, 0, 0, 0, 0xff, 0xff};
      int loop = v6 ? (memcmp(addr, lo6, 16) == 0 ||
                       (memcmp(addr, mapped, 12) == 0 && addr[12] == 127))
                    : addr[0] == 127;
      if (!loop) {
        snprintf(why, wlen,
                 "tcp address %s is not loopback (allow_non_loopback is "
                 "false)",
                 address);
        return why;
      }
    }
    if (v6)
      snprintf(target, tlen, "ipv6:[%s]:%ld", host, port);
    else
      snprintf(target, tlen, "ipv4:%s:%ld", host, port);
    return NULL;
  }
  snprintf(why, wlen, "unsupported network \"%.32s\" (expected \"unix\" or "
                      "\"tcp\")",
           network);
  return why;
}

/* --------------------------------------------------------- messages */

static void open_sub(rp_broker *b, bstream *st, const Plugin__ConnInfo *m,
                     actions *a) {
  const rp_config *cfg = &b->inst->cfg;
  char target[300], whybuf[256];
  const char *why;
  sub *s = find_sub(b, m->service_id);
  bitem *it;

  if (s && s->state == SUB_OPEN) {
    grpc_connectivity_state cs =
        grpc_channel_check_connectivity_state(s->ch, 1);
    if (cs == GRPC_CHANNEL_READY) {
      queue_ready(b, st, conninfo(s->id, NULL, NULL, 1, 1, 1, NULL), s->id);
      return;
    }
    if (!b->stopping && !b->handing) {
      /* Its target went away (or the connection idled): this knock waits
       * for READY again, within connect_timeout_ms, as a first one does;
       * if it does not come the subchannel is closed. */
      if (cs == GRPC_CHANNEL_IDLE)
        cs = grpc_channel_check_connectivity_state(s->ch, 0);
      if (cs != GRPC_CHANNEL_CONNECTING) cs = GRPC_CHANNEL_IDLE; /* at once */
      s->state = SUB_CONNECTING;
      s->deadline = gpr_time_add(
          gpr_now(GPR_CLOCK_MONOTONIC),
          gpr_time_from_millis(cfg->broker.connect_timeout_ms, GPR_TIMESPAN));
      if (!s->watching) watch(b, s, cs);
    }
  }
  if (b->stopping || b->handing) {
    queue_ready(b, st,
                error_reply(b, m->service_id,
                            b->stopping ? "plugin is shutting down"
                                        : "plugin swapped its "
                                          "implementation; knock again"),
                m->service_id);
    return;
  }
  if (s == NULL) {
    why = check_address(cfg, m->network, m->address, target, sizeof target,
                        whybuf, sizeof whybuf);
    if (why == NULL && b->nsubs >= cfg->broker.max_subchannels) {
      snprintf(whybuf, sizeof whybuf, "subchannel limit (%u) reached",
               cfg->broker.max_subchannels);
      why = whybuf;
    }
    if (why == NULL) {
      grpc_connectivity_state cs;
      s = calloc(1, sizeof *s);
      if (s == NULL) {
        why = "out of memory";
      } else {
        s->b = b;
        s->id = m->service_id;
        snprintf(s->network, sizeof s->network, "%s", m->network);
        snprintf(s->address, sizeof s->address, "%s", m->address);
        s->watch.tag.on_done = watch_done;
        s->watch.s = s;
        s->state = SUB_CONNECTING;
        s->ch = grpc_channel_create(target, b->creds, &b->args);
        s->deadline = gpr_time_add(
            gpr_now(GPR_CLOCK_MONOTONIC),
            gpr_time_from_millis(cfg->broker.connect_timeout_ms,
                                 GPR_TIMESPAN));
        s->next = *bucket(b, s->id);
        *bucket(b, s->id) = s;
        b->nsubs++;
        cs = grpc_channel_check_connectivity_state(s->ch, 1);
        /* Asking to connect usually moves an idle channel to CONNECTING
         * before the call returns: look again, so the first watch waits
         * for READY instead of reporting that step.  The channel may be
         * READY (or failed) already: then watch from IDLE, so the watch
         * fires at once and watch_done sees the state. */
        if (cs == GRPC_CHANNEL_IDLE)
          cs = grpc_channel_check_connectivity_state(s->ch, 0);
        if (cs != GRPC_CHANNEL_CONNECTING) cs = GRPC_CHANNEL_IDLE;
        watch(b, s, cs);
      }
    }
    if (why) {
      queue_ready(b, st, error_reply(b, m->service_id, why), m->service_id);
      return;
    }
  }
  /* Connecting: the reply waits for the result. */
  it = calloc(1, sizeof *it);
  if (it == NULL) {
    queue_ready(b, st, error_reply(b, m->service_id, "out of memory"),
                m->service_id);
    return;
  }
  it->id = s->id;
  item_push(st, it);
  it->wnext = s->waiting;
  s->waiting = it;
  st->waiting = 1;
}

static void close_request(rp_broker *b, bstream *st,
                          const Plugin__ConnInfo *m, actions *a) {
  sub *s = find_sub(b, m->service_id);
  char why[128];
  if (s == NULL) {
    snprintf(why, sizeof why, "subchannel %u not found",
             (unsigned)m->service_id);
    queue_ready(b, st, error_reply(b, m->service_id, why), m->service_id);
    return;
  }
  snprintf(why, sizeof why, "subchannel %u closed before it was ready",
           (unsigned)m->service_id);
  close_sub(b, s, why, a);
  queue_ready(b, st, conninfo(m->service_id, NULL, NULL, 1, 0, 1, NULL),
              m->service_id);
}

static void answer(rp_broker *b, const Plugin__ConnInfo *m) {
  knock_waiter *w;
  for (w = b->waiters; w; w = w->next)
    if (w->id == m->service_id && !w->done) {
      w->done = 1;
      w->ack = m->knock->ack && m->knock->error[0] == '\0';
      snprintf(w->error, sizeof w->error, "%s", m->knock->error);
      pthread_cond_broadcast(&b->cv);
      return;
    }
}

static void record_advert(rp_broker *b, const Plugin__ConnInfo *m) {
  advert *ad, **pp;
  for (pp = &b->adverts; *pp; pp = &(*pp)->next)
    if ((*pp)->info.service_id == m->service_id) {
      ad = *pp;
      *pp = ad->next;
      b->nadverts--;
      free(ad);
      break;
    }
  if (b->nadverts >= MAX_ADVERTS) { /* forget the oldest */
    for (pp = &b->adverts; (*pp)->next; pp = &(*pp)->next) {
    }
    free(*pp);
    *pp = NULL;
    b->nadverts--;
  }
  ad = calloc(1, sizeof *ad);
  if (ad == NULL) return;
  ad->info.service_id = m->service_id;
  snprintf(ad->info.network, sizeof ad->info.network, "%s", m->network);
  snprintf(ad->info.address, sizeof ad->info.address, "%s", m->address);
  ad->next = b->adverts;
  b->adverts = ad;
  b->nadverts++;
  pthread_cond_broadcast(&b->cv);
}

static void handle(rp_broker *b, bstream *st, const Plugin__ConnInfo *m,
                   actions *a) {
  const Plugin__ConnInfo__Knock *k = m->knock;
  if (k && (k->ack || k->error[0] != '\0')) {
    answer(b, m);
    return;
  }
  if (m->service_id == 0) {
    queue_ready(b, st, error_reply(b, 0, "service_id 0 is not valid"), 0);
    return;
  }
  if (k && k->knock && RPCPLUGIN_HOST_HAS(&b->inst->host, broker_mux_knock)) {
    /* Multiplexing (host ABI 1.3): the client's Dial of a service the host
     * brokered.  go-plugin's listenForKnocks: the ack always says
     * ack:true, with the reason as its error when the knock cannot be
     * served. */
    char why[256];
    int rc;
    why[0] = '\0';
    rc = b->inst->host.broker_mux_knock(b->inst->host.host_ctx,
                                        m->service_id, why, sizeof why);
    if (rc != RPCPLUGIN_EUNSUPPORTED) {
      if (rc != 0) {
        b->errors++;
        if (why[0] == '\0')
          snprintf(why, sizeof why, "knock refused (error %d)", rc);
      }
      queue_ready(b, st,
                  conninfo(m->service_id, NULL, NULL, 1, 1, 1,
                           rc ? why : NULL),
                  m->service_id);
      return;
    }
  }
  if (k && k->knock) {
    open_sub(b, st, m, a);
  } else if (k) {
    close_request(b, st, m, a);
  } else if (m->address[0] != '\0') {
    char target[300], whybuf[256];
    const char *why =
        check_address(&b->inst->cfg, m->network, m->address, target,
                      sizeof target, whybuf, sizeof whybuf);
    if (why || strlen(m->network) >= sizeof(((rpcplugin_conn_info *)0)->network))
      queue_ready(b, st,
                  error_reply(b, m->service_id, why ? why : "bad network"),
                  m->service_id);
    else
      record_advert(b, m);
  } else {
    queue_ready(b, st,
                error_reply(b, m->service_id,
                            "ConnInfo has neither a knock nor an address"),
                m->service_id);
  }
}

/* ------------------------------------------------------- call events */

/* Handle queued messages until one has to wait for a connect. */
static void process_locked(rp_broker *b, bstream *st, actions *a) {
  while (!st->waiting && !st->closed && st->in_head) {
    inmsg *x = st->in_head;
    st->in_head = x->next;
    if (st->in_head == NULL) st->in_tail = NULL;
    st->nin--;
    if (x->m) {
      handle(b, st, x->m, a);
      rp_msg_free(&x->m->base);
    } else {
      queue_ready(b, st, error_reply(b, x->id, x->why), x->id);
    }
    free(x);
  }
}

static void in_push(bstream *st, Plugin__ConnInfo *m, uint32_t id,
                    const char *why) {
  inmsg *x = calloc(1, sizeof *x);
  if (x == NULL) { /* cannot keep it in order: answer nothing, count it */
    if (m) rp_msg_free(&m->base);
    return;
  }
  x->m = m;
  x->id = id;
  x->why = why;
  if (st->in_tail)
    st->in_tail->next = x;
  else
    st->in_head = x;
  st->in_tail = x;
  st->nin++;
}

/* Free the messages received and not yet handled (the stream ended or
 * moved).  Under b->mu. */
static void drop_inputs_locked(bstream *st) {
  while (st->in_head) {
    inmsg *x = st->in_head;
    st->in_head = x->next;
    if (x->m) rp_msg_free(&x->m->base);
    free(x);
  }
  st->in_tail = NULL;
  st->nin = 0;
}

static void recv_done(rp_call *c, int ok) {
  bstream *st = c->svc;
  rp_broker *b = c->inst->broker;
  grpc_byte_buffer *bb = c->recv_buf;
  Plugin__ConnInfo *m = NULL;
  actions a = {0};
  size_t max = b->inst->cfg.broker.max_pending_per_stream;
  int end = !ok || bb == NULL; /* the client's side is over */
  c->recv_buf = NULL;
  if (!end) {
    m = (Plugin__ConnInfo *)rp_decode(&plugin__conn_info__descriptor, bb);
    grpc_byte_buffer_destroy(bb);
  }
  pthread_mutex_lock(&b->mu);
  if (end) {
    st->half_closed = 1;
  } else if (st->closed || st->finishing) {
    /* Too late: its status is on its way or sent, and its queues are
     * freed (or about to be).  Nothing could be answered. */
    rp_msg_free(m ? &m->base : NULL);
  } else {
    b->messages_in++;
    if (m == NULL) {
      in_push(st, NULL, 0, "cannot decode plugin.ConnInfo");
    } else if (st->nitems + st->nin >= max) {
      in_push(st, NULL, m->service_id,
              "too many pending messages on this stream");
      rp_msg_free(&m->base);
    } else if (!st->waiting && st->in_head == NULL) {
      handle(b, st, m, &a); /* nothing ahead of it: no queueing */
      rp_msg_free(&m->base);
    } else {
      in_push(st, m, 0, NULL);
    }
    process_locked(b, st, &a);
    if (!st->closed && !b->stopping) {
      if (st->nitems + st->nin >= 2 * max)
        st->paused = 1; /* resumed by pump_locked as the queues drain */
      else
        actions_add(&a, st, NULL, 0, 1);
    }
  }
  pump_locked(b, st, &a);
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);
}

static void send_done(rp_call *c, int ok) {
  bstream *st = c->svc;
  rp_broker *b = c->inst->broker;
  actions a = {0};
  pthread_mutex_lock(&b->mu);
  st->sending = 0;
  if (ok)
    b->messages_out++;
  else
    st->half_closed = 1; /* the client is gone; stop reading */
  pump_locked(b, st, &a);
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);
}

static void finish_done(rp_call *c, int ok) {
  bstream *st = c->svc;
  rp_broker *b = c->inst->broker;
  (void)ok;
  pthread_mutex_lock(&b->mu);
  st->finished = 1;
  pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);
}

static void closed(rp_call *c, int ok) {
  bstream *st = c->svc;
  rp_broker *b = c->inst->broker;
  bitem *it, *next;
  int trim = 0;
  (void)ok;
  pthread_mutex_lock(&b->mu);
  if (!st->closed) { /* closed already: unlinked by a handover */
    stream_unlink_locked(b, st);
    trim = rp_trim_note(&b->trim, b->nstreams);
  }
  for (it = st->head; it; it = next) {
    next = it->next;
    if (it->bb) {
      grpc_byte_buffer_destroy(it->bb);
      free(it);
    } else {
      it->st = NULL; /* still listed by a connecting subchannel */
    }
  }
  st->head = st->tail = NULL;
  st->nitems = 0;
  drop_inputs_locked(st);
  pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);
  rp_call_unref(c);
  if (trim) rp_trim_now();
}

static void opened(rp_call *c, int ok) {
  bstream *st = c->svc;
  rp_broker *b = c->inst->broker;
  actions a = {0};
  pthread_mutex_lock(&b->mu);
  st->sending = 0;
  if (ok) pump_locked(b, st, &a);
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);
}

static void stream_call(rp_instance *inst, grpc_call *call,
                        grpc_byte_buffer *req) {
  rp_broker *b = inst->broker;
  rp_call *c;
  bstream *st;
  if (req) grpc_byte_buffer_destroy(req);
  c = rp_call_adopt(&inst->calls, inst, call, sizeof(bstream));
  if (c == NULL) return;
  st = c->svc;
  st->c = c;
  (void)rp_call_use_relays(c, &inst->host); /* a swap can move it */
  if (rp_call_watch_close(c, closed) != 0) {
    rp_call_unref(c);
    return;
  }
  pthread_mutex_lock(&b->mu);
  if (b->nstreams >= inst->cfg.broker.max_streams) {
    /* Refused; its close watch finds it closed and only releases it. */
    char why[160];
    st->closed = 1;
    pthread_mutex_unlock(&b->mu);
    snprintf(why, sizeof why,
             "too many GRPCBroker streams: %u open (config.broker.max_streams)",
             inst->cfg.broker.max_streams);
    rp_call_cancel(c, GRPC_STATUS_RESOURCE_EXHAUSTED, why);
    return;
  }
  st->next = b->streams;
  if (b->streams) b->streams->prev = st;
  b->streams = st;
  b->nstreams++;
  (void)rp_trim_note(&b->trim, b->nstreams);
  st->sending = 1;
  pthread_mutex_unlock(&b->mu);
  if (rp_call_send_metadata(c, opened) != 0) {
    pthread_mutex_lock(&b->mu);
    st->sending = 0;
    pthread_mutex_unlock(&b->mu);
  }
  if (rp_call_recv(c, recv_done) != 0)
    rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot read the stream");
}

/* --------------------------------------------------------- host API */

static rp_broker *broker_of(void *instance) {
  rp_instance *inst = instance;
  return inst ? inst->broker : NULL;
}

int rp_broker_advertise(void *instance, uint32_t service_id,
                        const char *network, const char *address) {
  rp_broker *b = broker_of(instance);
  actions a = {0};
  bstream *st;
  int rc = 0;
  if (b == NULL) return RPCPLUGIN_EUNSUPPORTED;
  if (service_id == 0 || network == NULL || address == NULL ||
      (strcmp(network, "unix") != 0 && strcmp(network, "tcp") != 0) ||
      strlen(address) == 0 || strlen(address) > 255)
    return RPCPLUGIN_EINVAL;
  pthread_mutex_lock(&b->mu);
  if (b->stopping || b->handing) {
    rc = RPCPLUGIN_ESHUTDOWN;
  } else {
    int sent = 0;
    for (st = b->streams; st; st = st->next) {
      if (st->closed || st->finishing) continue;
      if (queue_ready(b, st, conninfo(service_id, network, address, 0, 0, 0,
                                      NULL),
                      service_id) == 0)
        sent++;
      pump_locked(b, st, &a);
    }
    if (sent == 0) rc = RPCPLUGIN_ENOTFOUND;
  }
  b->nhost++;
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);
  pthread_mutex_lock(&b->mu);
  if (--b->nhost == 0) pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);
  return rc;
}

int rp_broker_wait_advertised(void *instance, uint32_t service_id,
                              int timeout_ms, rpcplugin_conn_info *out) {
  rp_broker *b = broker_of(instance);
  struct timespec dl;
  int rc = 0;
  if (b == NULL) return RPCPLUGIN_EUNSUPPORTED;
  if (out == NULL || service_id == 0) return RPCPLUGIN_EINVAL;
  if (rp_on_poller(b->inst)) return RPCPLUGIN_EWRONGTHREAD;
  if (timeout_ms >= 0) rp_deadline_after_ms(&dl, timeout_ms);
  pthread_mutex_lock(&b->mu);
  for (;;) {
    advert *ad;
    for (ad = b->adverts; ad; ad = ad->next)
      if (ad->info.service_id == service_id) break;
    if (ad) {
      *out = ad->info;
      break;
    }
    if (b->stopping || b->handing) {
      rc = RPCPLUGIN_ESHUTDOWN;
      break;
    }
    if (timeout_ms < 0)
      pthread_cond_wait(&b->cv, &b->mu);
    else if (pthread_cond_timedwait(&b->cv, &b->mu, &dl) == ETIMEDOUT) {
      rc = RPCPLUGIN_ETIMEDOUT;
      break;
    }
  }
  pthread_mutex_unlock(&b->mu);
  return rc;
}

int rp_broker_knock(void *instance, uint32_t service_id, const char *network,
                    const char *address, int timeout_ms, char *err,
                    size_t errlen) {
  rp_broker *b = broker_of(instance);
  knock_waiter w, **pp;
  struct timespec dl;
  actions a = {0};
  bstream *st;
  int rc = 0;
  if (err && errlen) err[0] = '\0';
  if (b == NULL) return RPCPLUGIN_EUNSUPPORTED;
  if (service_id == 0 || network == NULL || address == NULL ||
      strlen(address) > 255 || strlen(network) > 15)
    return RPCPLUGIN_EINVAL;
  if (rp_on_poller(b->inst)) return RPCPLUGIN_EWRONGTHREAD;
  memset(&w, 0, sizeof w);
  w.id = service_id;
  if (timeout_ms >= 0) rp_deadline_after_ms(&dl, timeout_ms);
  pthread_mutex_lock(&b->mu);
  for (st = b->streams; st; st = st->next)
    if (!st->closed && !st->finishing) break;
  if (b->stopping || b->handing) {
    pthread_mutex_unlock(&b->mu);
    return RPCPLUGIN_ESHUTDOWN;
  }
  if (st == NULL) {
    pthread_mutex_unlock(&b->mu);
    if (err && errlen) snprintf(err, errlen, "no broker stream is open");
    return RPCPLUGIN_ENOTFOUND;
  }
  w.next = b->waiters;
  b->waiters = &w;
  queue_ready(b, st, conninfo(service_id, network, address, 1, 1, 0, NULL),
              service_id);
  pump_locked(b, st, &a);
  b->nhost++;
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);

  pthread_mutex_lock(&b->mu);
  if (--b->nhost == 0) pthread_cond_broadcast(&b->cv);
  while (!w.done && !b->stopping && !b->handing) {
    if (timeout_ms < 0)
      pthread_cond_wait(&b->cv, &b->mu);
    else if (pthread_cond_timedwait(&b->cv, &b->mu, &dl) == ETIMEDOUT)
      break;
  }
  if (w.done && w.ack) {
    rc = 0;
  } else if (w.done) {
    rc = RPCPLUGIN_EREFUSED;
    if (err && errlen) snprintf(err, errlen, "%s", w.error);
  } else {
    /* A swap: the host knocks again through the new instance. */
    rc = (b->stopping || b->handing) ? RPCPLUGIN_ESHUTDOWN
                                      : RPCPLUGIN_ETIMEDOUT;
  }
  for (pp = &b->waiters; *pp; pp = &(*pp)->next)
    if (*pp == &w) {
      *pp = w.next;
      break;
    }
  pthread_mutex_unlock(&b->mu);
  return rc;
}

int rp_broker_channel(void *instance, uint32_t service_id,
                      grpc_channel **out) {
  rp_broker *b = broker_of(instance);
  sub *s;
  int rc = RPCPLUGIN_ENOTFOUND;
  if (b == NULL) return RPCPLUGIN_EUNSUPPORTED;
  if (out == NULL) return RPCPLUGIN_EINVAL;
  *out = NULL;
  pthread_mutex_lock(&b->mu);
  s = find_sub(b, service_id);
  if (s && s->state == SUB_OPEN && s->ch && !b->stopping) {
    s->borrowers++;
    *out = s->ch;
    rc = 0;
  }
  pthread_mutex_unlock(&b->mu);
  return rc;
}

void rp_broker_release_channel(void *instance, grpc_channel *channel) {
  rp_broker *b = broker_of(instance);
  size_t i;
  sub *s = NULL;
  if (b == NULL || channel == NULL) return;
  pthread_mutex_lock(&b->mu);
  for (i = 0; i < NBUCKETS && s == NULL; i++)
    for (s = b->table[i]; s && s->ch != channel; s = s->next) {
    }
  if (s == NULL)
    for (s = b->closed; s && s->ch != channel; s = s->next) {
    }
  if (s && s->borrowers > 0) {
    s->borrowers--;
    if (s->state == SUB_CLOSED && s->borrowers == 0 && s->ch) {
      grpc_channel_destroy(s->ch);
      s->ch = NULL;
      free_sub_if_done(b, s);
    }
  }
  pthread_mutex_unlock(&b->mu);
}

void rp_broker_stats(rp_broker *b, rpcplugin_stats *out) {
  pthread_mutex_lock(&b->mu);
  out->broker_streams = b->nstreams;
  out->broker_subchannels = b->nsubs;
  out->broker_messages_in = b->messages_in;
  out->broker_messages_out = b->messages_out;
  out->broker_errors = b->errors;
  pthread_mutex_unlock(&b->mu);
}

/* ---------------------------------------------------------- service */

static int broker_create(rp_instance *inst, char *err, size_t errlen) {
  rp_broker *b = calloc(1, sizeof *b);
  if (b == NULL) {
    snprintf(err, errlen, "out of memory");
    return RPCPLUGIN_ENOMEM;
  }
  b->inst = inst;
  b->arg[0].type = GRPC_ARG_INTEGER;
  b->arg[0].key = (char *)GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
  b->arg[0].value.integer = 1;
  b->args.num_args = 1;
  b->args.args = b->arg;
  if (inst->tls_peer) {
    grpc_ssl_pem_key_cert_pair pair = {inst->tls_key, inst->tls_cert};
    b->tls = 1;
    b->creds = grpc_ssl_credentials_create(inst->tls_peer, &pair, NULL, NULL);
    b->arg[1].type = GRPC_ARG_STRING;
    b->arg[1].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    b->arg[1].value.string = (char *)"localhost";
    b->args.num_args = 2;
  } else {
    b->creds = grpc_insecure_credentials_create();
  }
  if (b->creds == NULL) {
    snprintf(err, errlen, "broker: cannot create the %s channel credentials",
             b->tls ? "TLS" : "insecure");
    free(b);
    return RPCPLUGIN_EGRPC;
  }
  pthread_mutex_init(&b->mu, NULL);
  rp_cond_init_monotonic(&b->cv);
  inst->broker = b;
  return 0;
}

/* ----------------------------------------------------------- handover */

/* A swap (docs/abi.md, "Live swap"): host entries are refused (the host
 * goes again to the new instance), knocks still connecting and every
 * subchannel are closed (a knock still waiting is answered with an error:
 * "knock again"), messages already received are handled, and then each
 * stream goes over with its pending receive, its send in flight and its
 * unsent replies in order, and the peer's advertisements with them. */
int rp_broker_handover_out(rp_broker *b, rp_handover *ho) {
  actions a = {0};
  bstream *st;
  advert *ad;
  size_t i, n;
  int rc = 0;
  pthread_mutex_lock(&b->mu);
  b->handing = 1;
  pthread_cond_broadcast(&b->cv); /* waiters in knock / wait_advertised */
  while (b->nhost > 0) pthread_cond_wait(&b->cv, &b->mu);
  for (i = 0; i < NBUCKETS; i++)
    while (b->table[i])
      close_sub(b, b->table[i],
                "plugin swapped its implementation; knock again", &a);
  for (st = b->streams; st; st = st->next) {
    process_locked(b, st, &a);
    pump_locked(b, st, &a);
  }
  /* The peer's advertisements, oldest first (the new broker records them
   * in that order, newest on top again). */
  for (n = 0, ad = b->adverts; ad; ad = ad->next) n++;
  if (n) {
    ho->peer = calloc(n, sizeof *ho->peer);
    if (ho->peer == NULL) {
      rc = RPCPLUGIN_ENOMEM;
    } else {
      for (i = n, ad = b->adverts; ad; ad = ad->next) ho->peer[--i] = ad->info;
      ho->npeer = n;
    }
  }
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);

  for (;;) {
    rp_call_handoff ex;
    rp_call *c;
    uint8_t *u = NULL;
    size_t ulen = 0;
    bitem *it, *next;
    int half;
    pthread_mutex_lock(&b->mu);
    for (st = b->streams; st; st = st->next)
      if (!st->closed) break;
    if (st == NULL) {
      pthread_mutex_unlock(&b->mu);
      break;
    }
    c = st->c;
    rp_call_ref(c);
    /* Out of the list now: nothing of this instance touches it again. */
    stream_unlink_locked(b, st);
    pthread_mutex_unlock(&b->mu);
    if (rp_call_export(c, &ex) != 0) {
      /* No relays: it cannot move.  Its watch still runs closed(), which
       * must not unlink it again. */
      rp_call_cancel(c, GRPC_STATUS_UNAVAILABLE, "plugin swapped");
      rp_call_unref(c);
      continue;
    }
    pthread_mutex_lock(&b->mu);
    half = st->half_closed;
    for (it = st->head; it; it = next) {
      next = it->next;
      if (it->bb) {
        grpc_slice sl = rp_flatten(it->bb);
        uint8_t *more = rp_frame_append(u, &ulen, GRPC_SLICE_START_PTR(sl),
                                        GRPC_SLICE_LENGTH(sl));
        grpc_slice_unref(sl);
        if (more)
          u = more;
        else
          rc = RPCPLUGIN_ENOMEM;
        grpc_byte_buffer_destroy(it->bb);
        free(it);
      } else {
        it->st = NULL; /* cannot happen: every subchannel was closed */
      }
    }
    st->head = st->tail = NULL;
    st->nitems = 0;
    drop_inputs_locked(st);
    pthread_mutex_unlock(&b->mu);
    if (rp_handover_add_stream(ho, "/plugin.GRPCBroker/StartStream", &ex,
                               half, u, ulen) != 0) {
      rc = RPCPLUGIN_ENOMEM;
      grpc_call_cancel_with_status(ex.call, GRPC_STATUS_UNAVAILABLE,
                                   "plugin swapped", NULL);
      grpc_call_unref(ex.call);
    }
    rp_call_unref(c); /* ours */
    rp_call_unref(c); /* the stream's: closed() will not run */
  }
  return rc;
}

void rp_broker_handover_in(rp_broker *b, const rpcplugin_handover *h) {
  rp_instance *inst = b->inst;
  size_t i;
  /* The peer's advertisements first: dials may wait for them. */
  pthread_mutex_lock(&b->mu);
  for (i = 0; i < h->npeer_adverts; i++) {
    Plugin__ConnInfo m = PLUGIN__CONN_INFO__INIT;
    rpcplugin_conn_info ci = h->peer_adverts[i];
    ci.network[sizeof ci.network - 1] = '\0';
    ci.address[sizeof ci.address - 1] = '\0';
    m.service_id = ci.service_id;
    m.network = ci.network;
    m.address = ci.address;
    record_advert(b, &m);
  }
  pthread_mutex_unlock(&b->mu);
  for (i = 0; i < h->nstreams; i++) {
    const rpcplugin_handover_stream *hs = &h->streams[i];
    actions a = {0};
    rp_call *c;
    bstream *st;
    size_t off = 0;
    const uint8_t *u = hs->unsent;
    int need_recv, need_md;
    if (strcmp(hs->method, "/plugin.GRPCBroker/StartStream") != 0) continue;
    c = rp_call_import(&inst->calls, inst, &inst->host, hs, sizeof(bstream));
    if (c == NULL) continue;
    st = c->svc;
    st->c = c;
    pthread_mutex_lock(&b->mu);
    st->next = b->streams;
    if (b->streams) b->streams->prev = st;
    b->streams = st;
    b->nstreams++;
    st->sending = hs->send != NULL;
    st->half_closed = hs->recv_ended;
    while (u && off + 4 <= hs->unsent_len) {
      size_t len = (size_t)u[off] | (size_t)u[off + 1] << 8 |
                   (size_t)u[off + 2] << 16 | (size_t)u[off + 3] << 24;
      grpc_slice sl;
      off += 4;
      if (len > hs->unsent_len - off) break;
      sl = grpc_slice_from_copied_buffer((const char *)u + off, len);
      queue_ready(b, st, grpc_raw_byte_buffer_create(&sl, 1), 0);
      grpc_slice_unref(sl);
      off += len;
    }
    need_recv = hs->recv == NULL && !hs->recv_ended;
    need_md = hs->send == NULL && !hs->metadata_sent;
    if (need_md) st->sending = 1;
    pthread_mutex_unlock(&b->mu);
    rp_call_resume(c, send_done, recv_done, hs->close ? closed : NULL);
    if (!hs->close && rp_call_watch_close(c, closed) != 0)
      rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot watch the stream");
    if (need_md && rp_call_send_metadata(c, opened) != 0) {
      pthread_mutex_lock(&b->mu);
      st->sending = 0;
      pthread_mutex_unlock(&b->mu);
    }
    if (need_recv && rp_call_recv(c, recv_done) != 0)
      rp_call_cancel(c, GRPC_STATUS_INTERNAL, "cannot read the stream");
    pthread_mutex_lock(&b->mu);
    pump_locked(b, st, &a);
    pthread_mutex_unlock(&b->mu);
    run_actions(b, &a);
  }
}

/* Close every subchannel, let streams send what is queued and finish with
 * OK (bounded by the flush deadline), and wait for every connectivity
 * watch to come back. */
static void broker_stop(rp_instance *inst) {
  rp_broker *b = inst->broker;
  actions a = {0};
  struct timespec dl;
  bstream *st;
  size_t i;
  rp_deadline_after_ms(&dl, inst->cfg.stdio.flush_deadline_ms);
  pthread_mutex_lock(&b->mu);
  b->stopping = 1;
  for (i = 0; i < NBUCKETS; i++)
    while (b->table[i]) close_sub(b, b->table[i], "plugin is shutting down", &a);
  { /* closed while connecting, waiting for the attempt to end: now */
    sub *s;
    for (s = b->closed; s; s = s->next)
      if (s->ch && s->borrowers == 0) {
        grpc_channel_destroy(s->ch);
        s->ch = NULL;
      }
  }
  for (st = b->streams; st; st = st->next) pump_locked(b, st, &a);
  pthread_cond_broadcast(&b->cv);
  pthread_mutex_unlock(&b->mu);
  run_actions(b, &a);

  pthread_mutex_lock(&b->mu);
  for (;;) {
    int busy = 0;
    for (st = b->streams; st; st = st->next)
      if (!st->finished) busy = 1;
    if (!busy) break;
    if (pthread_cond_timedwait(&b->cv, &b->mu, &dl) == ETIMEDOUT) break;
  }
  while (b->nwatching > 0) pthread_cond_wait(&b->cv, &b->mu);
  pthread_mutex_unlock(&b->mu);
}

static void broker_destroy(rp_instance *inst) {
  rp_broker *b = inst->broker;
  if (b == NULL) return;
  while (b->closed) {
    sub *s = b->closed;
    b->closed = s->next;
    if (s->ch) grpc_channel_destroy(s->ch);
    free(s);
  }
  while (b->adverts) {
    advert *ad = b->adverts;
    b->adverts = ad->next;
    free(ad);
  }
  grpc_channel_credentials_release(b->creds);
  pthread_cond_destroy(&b->cv);
  pthread_mutex_destroy(&b->mu);
  free(b);
  inst->broker = NULL;
}

static const rp_method_def methods[] = {
    {"/plugin.GRPCBroker/StartStream", RPCPLUGIN_BIDI_STREAMING, stream_call},
};

const rp_service rp_broker_service = {
    .name = "plugin.GRPCBroker",
    .methods = methods,
    .nmethods = 1,
    .create = broker_create,
    .stop = broker_stop,
    .destroy = broker_destroy,
};
