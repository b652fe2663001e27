/* libFuzzer: the broker's per-message handling (module/broker.c) driven by
 * arbitrary sequences of events.
 *
 * broker.c is compiled into this file as it is, with two things replaced:
 *  - the call engine (rp_call_*): a fake whose operations stay pending until
 *    the input completes them, in any order the real completion queue could
 *    (a send, a receive, a finish and the close watch of each stream);
 *  - the four grpc_channel_* functions the subchannels use: fake channels
 *    whose connectivity watches the input completes with READY, a failure,
 *    a shutdown or a timeout.  No connection is ever made.
 * The input picks the module's limits, then a sequence of events: streams
 * opened, messages delivered (ConnInfo built from the input, or raw bytes),
 * half-closes, client cancels, sends/finishes/watches completed (ok or
 * not), host advertisements, and the module's shutdown part way through.
 * At the end every stream is half-closed (or, after a cancel, failed) and
 * every pending operation completed until nothing is left.
 *
 * What must hold (a violation traps):
 *  - no operation is started in a slot that is busy (the real engine would
 *    refuse it and a reply would be lost);
 *  - the replies of a stream are a subsequence of its requests' service ids
 *    (replies leave in request order, none is invented);
 *  - a stream that was half-closed and never cancelled ends with a status,
 *    after every request that needs an answer got exactly one
 *    (knocks, closes, id 0, undecodable bytes) and at most one for each
 *    advertisement or answer (answered when refused);
 *  - with allow_non_loopback false, no channel is made to anything but a
 *    unix path or a loopback address;
 *  - every channel is destroyed exactly once, every call freed, and
 *    nothing is left connecting (the shutdown would hang: libFuzzer's
 *    timeout catches that);
 *  - ASan/UBSan: no invalid access, no leak.
 */
#define grpc_channel_create fz_channel_create
#define grpc_channel_destroy fz_channel_destroy
#define grpc_channel_check_connectivity_state fz_check_state
#define grpc_channel_watch_connectivity_state fz_watch

#include "../../module/broker.c"

#include <grpc/byte_buffer_reader.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#define MAXS 6     /* streams per input */
#define MAXCH 64   /* channels per input */
#define MAXREQ 256 /* requests remembered per stream */

#define CHECK(x)                                      \
  do {                                                \
    if (!(x)) {                                       \
      fprintf(stderr, "fuzz_broker: %s failed (line %d)\n", #x, __LINE__); \
      __builtin_trap();                               \
    }                                                 \
  } while (0)

/* ---------------------------------------------------------- fake engine */

/* One lock for the fakes: the shutdown runs on a second thread. */
static pthread_mutex_t fz_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct fz_stream {
  rp_call *c;  /* NULL once freed */
  int cancelled;
  int half_closed_sent;
  int status_sent; /* finish completed */
  uint32_t req[MAXREQ];
  size_t nreq;
  int req_overflow;
  size_t must, maybe; /* requests that need one reply; that may get one */
  uint32_t rep[MAXREQ];
  size_t nrep;
} fz_stream;

static fz_stream streams_[MAXS];
static size_t nstreams_;
static size_t live_calls;

static fz_stream *fz_of(rp_call *c) {
  size_t i;
  for (i = 0; i < nstreams_; i++)
    if (streams_[i].c == c) return &streams_[i];
  return NULL;
}

rp_call *rp_call_adopt(rp_callset *set, rp_instance *owner, grpc_call *call,
                       size_t svc_size) {
  rp_call *c = calloc(1, sizeof *c + svc_size);
  CHECK(c != NULL);
  c->set = set;
  c->inst = owner;
  c->call = call;
  atomic_init(&c->refs, 1);
  c->svc = c + 1;
  live_calls++;
  CHECK(nstreams_ < MAXS);
  memset(&streams_[nstreams_], 0, sizeof streams_[0]);
  streams_[nstreams_++].c = c;
  return c;
}

void rp_call_ref(rp_call *c) { atomic_fetch_add(&c->refs, 1); }

void rp_call_unref(rp_call *c) {
  if (atomic_fetch_sub(&c->refs, 1) == 1) {
    fz_stream *f;
    pthread_mutex_lock(&fz_mu);
    f = fz_of(c);
    if (f) f->c = NULL;
    live_calls--;
    pthread_mutex_unlock(&fz_mu);
    if (c->send_buf) grpc_byte_buffer_destroy(c->send_buf);
    if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
    free(c);
  }
}

int rp_call_use_relays(rp_call *c, const rpcplugin_host_api *host) {
  (void)c;
  (void)host;
  return RPCPLUGIN_EUNSUPPORTED;
}

static int start(rp_call *c, rp_op *op, rp_call_cb cb) {
  int busy;
  pthread_mutex_lock(&fz_mu);
  busy = atomic_load(&op->busy);
  if (!busy) {
    atomic_store(&op->busy, 1);
    op->cb = cb;
    rp_call_ref(c);
  }
  pthread_mutex_unlock(&fz_mu);
  CHECK(!busy); /* the broker never starts a second op in a slot */
  return 0;
}

int rp_call_watch_close(rp_call *c, rp_call_cb cb) {
  return start(c, &c->close_op, cb);
}

int rp_call_send(rp_call *c, grpc_byte_buffer *bb, uint32_t flags,
                 rp_call_cb cb) {
  (void)flags;
  start(c, &c->send_op, cb);
  c->send_buf = bb;
  c->md_sent = 1;
  return 0;
}

int rp_call_send_metadata(rp_call *c, rp_call_cb cb) {
  CHECK(!c->md_sent);
  start(c, &c->send_op, cb);
  c->md_sent = 1;
  return 0;
}

int rp_call_recv(rp_call *c, rp_call_cb cb) {
  return start(c, &c->recv_op, cb);
}

int rp_call_finish(rp_call *c, grpc_status_code status, const char *details,
                   grpc_byte_buffer *msg, int with_close, rp_call_cb cb) {
  (void)details;
  CHECK(msg == NULL && !with_close);
  CHECK(status == GRPC_STATUS_OK);
  return start(c, &c->finish_op, cb);
}

void rp_call_cancel(rp_call *c, grpc_status_code status,
                    const char *details) {
  fz_stream *f;
  (void)status;
  (void)details;
  pthread_mutex_lock(&fz_mu);
  c->cancelled = 1;
  f = fz_of(c);
  if (f) f->cancelled = 1;
  pthread_mutex_unlock(&fz_mu);
}

/* Never reached: the fuzzer swaps nothing (export fails, the broker then
 * cancels the stream). */
int rp_call_export(rp_call *c, rp_call_handoff *out) {
  (void)c;
  (void)out;
  return RPCPLUGIN_ESTATE;
}
rp_call *rp_call_import(rp_callset *set, rp_instance *owner,
                        const rpcplugin_host_api *host,
                        const rpcplugin_handover_stream *hs, size_t svc_size) {
  (void)set, (void)owner, (void)host, (void)hs, (void)svc_size;
  return NULL;
}
void rp_call_resume(rp_call *c, rp_call_cb s, rp_call_cb r, rp_call_cb cl) {
  (void)c, (void)s, (void)r, (void)cl;
}
grpc_slice rp_flatten(grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader rd;
  grpc_slice s;
  grpc_byte_buffer_reader_init(&rd, bb);
  s = grpc_byte_buffer_reader_readall(&rd);
  grpc_byte_buffer_reader_destroy(&rd);
  return s;
}
int rp_handover_add_stream(rp_handover *ho, const char *method,
                           const rp_call_handoff *ex, int recv_ended,
                           void *unsent, size_t unsent_len) {
  (void)ho, (void)method, (void)ex, (void)recv_ended, (void)unsent_len;
  free(unsent);
  return RPCPLUGIN_ENOMEM;
}
uint8_t *rp_frame_append(uint8_t *buf, size_t *len, const void *msg,
                         size_t n) {
  (void)buf, (void)len, (void)msg, (void)n;
  return NULL;
}
void rp_log(rp_instance *inst, int level, const char *fmt, ...) {
  (void)inst, (void)level, (void)fmt;
}
int rp_on_poller(rp_instance *inst) {
  (void)inst;
  return 0;
}

/* Complete op (taken from its slot) with ok; the callback runs as on a
 * poller, then the op's reference goes. */
static void complete(rp_call *c, rp_op *op, int ok) {
  rp_call_cb cb;
  pthread_mutex_lock(&fz_mu);
  CHECK(atomic_load(&op->busy));
  atomic_store(&op->busy, 0);
  cb = op->cb;
  pthread_mutex_unlock(&fz_mu);
  cb(c, ok);
  rp_call_unref(c);
}

/* ------------------------------------------------------- fake channels */

struct grpc_channel {
  int state;
  int destroyed;
  int watch_pending;
  rpcplugin_tag *tag;
};

static struct grpc_channel chans_[MAXCH];
static size_t nchans_;
static int loopback_only;

static int loopback_target(const char *t) {
  char host[64];
  unsigned char a[16];
  const char *p, *e;
  if (strncmp(t, "unix:/", 6) == 0) return 1;
  if (strncmp(t, "ipv4:", 5) == 0) {
    p = t + 5;
    e = strrchr(p, ':');
    if (!e || (size_t)(e - p) >= sizeof host) return 0;
    memcpy(host, p, (size_t)(e - p));
    host[e - p] = '\0';
    return inet_pton(AF_INET, host, a) == 1 && a[0] == 127;
  }
  if (strncmp(t, "ipv6:[", 6) == 0) {
    static const unsigned char lo6[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0, 0, 0, 1};
    static const unsigned char m[12] = {0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0xff, 0xff};
    p = t + 6;
    e = strchr(p, ']');
    if (!e || (size_t)(e - p) >= sizeof host) return 0;
    memcpy(host, p, (size_t)(e - p));
    host[e - p] = '\0';
    return inet_pton(AF_INET6, host, a) == 1 &&
           (memcmp(a, lo6, 16) == 0 || (memcmp(a, m, 12) == 0 && a[12] == 127));
  }
  return 0;
}

grpc_channel *fz_channel_create(const char *target,
                                grpc_channel_credentials *creds,
                                const grpc_channel_args *args) {
  grpc_channel *ch;
  (void)creds;
  (void)args;
  if (loopback_only) CHECK(loopback_target(target));
  CHECK(nchans_ < MAXCH); /* bounded by max_subchannels and the input */
  pthread_mutex_lock(&fz_mu);
  ch = &chans_[nchans_++];
  memset(ch, 0, sizeof *ch);
  ch->state = GRPC_CHANNEL_IDLE;
  pthread_mutex_unlock(&fz_mu);
  return ch;
}

void fz_channel_destroy(grpc_channel *ch) {
  pthread_mutex_lock(&fz_mu);
  CHECK(!ch->destroyed);
  ch->destroyed = 1;
  ch->state = GRPC_CHANNEL_SHUTDOWN;
  pthread_mutex_unlock(&fz_mu);
}

grpc_connectivity_state fz_check_state(grpc_channel *ch, int try_to_connect) {
  grpc_connectivity_state s;
  pthread_mutex_lock(&fz_mu);
  CHECK(!ch->destroyed);
  if (try_to_connect && ch->state == GRPC_CHANNEL_IDLE)
    ch->state = GRPC_CHANNEL_CONNECTING;
  s = (grpc_connectivity_state)ch->state;
  pthread_mutex_unlock(&fz_mu);
  return s;
}

void fz_watch(grpc_channel *ch, grpc_connectivity_state last,
              gpr_timespec deadline, grpc_completion_queue *cq, void *tag) {
  (void)last;
  (void)deadline;
  (void)cq;
  pthread_mutex_lock(&fz_mu);
  CHECK(!ch->destroyed && !ch->watch_pending);
  ch->watch_pending = 1;
  ch->tag = tag;
  pthread_mutex_unlock(&fz_mu);
}

/* Complete ch's watch: how = 0 READY, 1 failure, 2 timeout, 3 still
 * connecting.  A destroyed channel reports SHUTDOWN. */
static void complete_watch(grpc_channel *ch, int how) {
  rpcplugin_tag *t;
  int ok = 1;
  pthread_mutex_lock(&fz_mu);
  CHECK(ch->watch_pending);
  ch->watch_pending = 0;
  t = ch->tag;
  if (!ch->destroyed) {
    if (how == 0) ch->state = GRPC_CHANNEL_READY;
    else if (how == 1) ch->state = GRPC_CHANNEL_TRANSIENT_FAILURE;
    else if (how == 2) ok = 0;
    else ch->state = GRPC_CHANNEL_CONNECTING;
  }
  pthread_mutex_unlock(&fz_mu);
  t->on_done(t, ok);
}

/* ---------------------------------------------------------- the input */

typedef struct input {
  const uint8_t *p;
  size_t n;
} input;

static unsigned next(input *in) {
  if (in->n == 0) return 0;
  in->n--;
  return *in->p++;
}

static const char *const networks[] = {"unix", "tcp", "udp", "", "tcp6",
                                       "UNIX"};
static const char *const addresses[] = {
    "/tmp/fz.sock", "127.0.0.1:1234", "[::1]:1", "localhost:80",
    "10.0.0.1:80", "[::ffff:10.0.0.1]:1", "[::ffff:127.0.0.1]:9",
    "example.com:80", "127.0.0.1:0", "127.0.0.1:65536", "relative.sock",
    "[::1]", "127.1:5", "0x7f.0.0.1:5", "", "[fe80::1%lo]:1",
    "/tmp/a-unix-path-that-is-exactly-one-hundred-and-eight-bytes-long-"
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "127.0.0.1:", ":80", "[::1]:80x"};

static void take_str(input *in, char *buf, size_t cap) {
  size_t len = next(in) % 24, i;
  if (len >= cap) len = cap - 1;
  for (i = 0; i < len; i++) buf[i] = (char)next(in);
  buf[len] = '\0';
}

/* Build one request from the input; say what it needs. */
typedef enum { NEEDS_ONE, ANSWER, ADVERT } need;

static grpc_byte_buffer *make_request(input *in, uint32_t *id, need *nd) {
  Plugin__ConnInfo m = PLUGIN__CONN_INFO__INIT;
  Plugin__ConnInfo__Knock k = PLUGIN__CONN_INFO__KNOCK__INIT;
  char net[32], addr[32], err[32];
  unsigned kind = next(in) % 9;
  m.service_id = 1 + next(in) % 8;
  if (next(in) % 16 == 0) m.service_id = next(in) << 24 | next(in);
  if (next(in) % 4 == 0) {
    take_str(in, net, sizeof net);
    m.network = net;
  } else {
    m.network = (char *)networks[next(in) % (sizeof networks /
                                             sizeof networks[0])];
  }
  if (next(in) % 4 == 0) {
    take_str(in, addr, sizeof addr);
    m.address = addr;
  } else {
    m.address = (char *)addresses[next(in) % (sizeof addresses /
                                              sizeof addresses[0])];
  }
  *nd = NEEDS_ONE;
  switch (kind) {
    case 0: case 1: /* knock */
      k.knock = 1;
      m.knock = &k;
      break;
    case 2: /* close */
      m.knock = &k;
      break;
    case 3: /* the peer's answer */
      k.ack = 1;
      m.knock = &k;
      *nd = ANSWER;
      break;
    case 4:
      take_str(in, err, sizeof err);
      k.error = err;
      k.knock = next(in) & 1;
      m.knock = &k;
      if (err[0]) *nd = ANSWER;
      break;
    case 5: /* advertisement (or neither, with no address) */
      if (m.address[0]) *nd = ADVERT;
      break;
    case 6:
      m.service_id = 0;
      k.knock = 1;
      m.knock = &k;
      break;
    case 7: { /* raw bytes: may not decode, or decode to anything */
      uint8_t raw[48];
      size_t len = next(in) % sizeof raw, i;
      grpc_slice s;
      grpc_byte_buffer *bb;
      Plugin__ConnInfo *d;
      for (i = 0; i < len; i++) raw[i] = (uint8_t)next(in);
      s = grpc_slice_from_copied_buffer((const char *)raw, len);
      bb = grpc_raw_byte_buffer_create(&s, 1);
      grpc_slice_unref(s);
      d = plugin__conn_info__unpack(NULL, len, raw);
      *id = 0;
      if (d) {
        *id = d->service_id;
        if (d->knock && (d->knock->ack || d->knock->error[0]))
          *nd = ANSWER;
        else if (!d->knock && d->service_id && d->address[0])
          *nd = ADVERT;
        plugin__conn_info__free_unpacked(d, NULL);
      }
      return bb;
    }
    default: /* neither knock nor address */
      m.address = "";
      break;
  }
  if (kind != 6 && m.service_id == 0 && *nd == ADVERT) *nd = NEEDS_ONE;
  *id = m.service_id;
  return rp_encode(&m.base);
}

static void record_reply(fz_stream *f, grpc_byte_buffer *bb) {
  Plugin__ConnInfo *m =
      (Plugin__ConnInfo *)rp_decode(&plugin__conn_info__descriptor, bb);
  CHECK(m != NULL);
  if (m->knock) { /* a reply (host advertisements carry no knock) */
    CHECK(f->nrep < MAXREQ);
    f->rep[f->nrep++] = m->service_id;
  }
  rp_msg_free(&m->base);
}

/* The replies are a subsequence of the requests' ids. */
static void check_order(const fz_stream *f) {
  size_t i = 0, j;
  if (f->req_overflow) return;
  for (j = 0; j < f->nrep; j++) {
    while (i < f->nreq && f->req[i] != f->rep[j]) i++;
    CHECK(i < f->nreq);
    i++;
  }
}

static rp_instance inst_;

static void deliver(fz_stream *f, grpc_byte_buffer *bb) {
  rp_call *c = f->c;
  c->recv_buf = bb;
  complete(c, &c->recv_op, 1);
}

/* One step of "the completion queue": complete what is pending on stream
 * f according to what (send, finish, close, failed recv).  Returns 1 if it
 * did something. */
static int step_stream(fz_stream *f, unsigned what, int ok) {
  rp_call *c = f->c;
  if (c == NULL) return 0;
  switch (what % 4) {
    case 0:
      if (atomic_load(&c->send_op.busy)) {
        grpc_byte_buffer *bb = c->send_buf;
        c->send_buf = NULL;
        if (bb) {
          record_reply(f, bb);
          grpc_byte_buffer_destroy(bb);
        }
        /* A send fails only when the stream is over: the client left. */
        if (!ok) f->cancelled = 1;
        complete(c, &c->send_op, !f->cancelled);
        return 1;
      }
      return 0;
    case 1:
      if (atomic_load(&c->finish_op.busy)) {
        f->status_sent = !f->cancelled;
        complete(c, &c->finish_op, !f->cancelled);
        return 1;
      }
      return 0;
    case 2: /* the close watch fires once the status went or on a cancel */
      if (atomic_load(&c->close_op.busy) && (f->status_sent || f->cancelled) &&
          !atomic_load(&c->finish_op.busy)) {
        c->cancelled = f->cancelled;
        complete(c, &c->close_op, 1);
        return 1;
      }
      return 0;
    default: /* a cancelled call's receive fails */
      if (atomic_load(&c->recv_op.busy) && f->cancelled) {
        complete(c, &c->recv_op, 0);
        return 1;
      }
      return 0;
  }
}

/* The module's shutdown runs on a second thread (one for the whole run,
 * started once), with the test as the completion queue meanwhile:
 * broker_stop waits for the watches of the channels it closes. */
static pthread_mutex_t stop_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stop_cv = PTHREAD_COND_INITIALIZER;
static int stop_asked;
static atomic_int stop_done;

static void *stop_thread(void *arg) {
  (void)arg;
  pthread_mutex_lock(&stop_mu);
  for (;;) {
    while (!stop_asked) pthread_cond_wait(&stop_cv, &stop_mu);
    stop_asked = 0;
    pthread_mutex_unlock(&stop_mu);
    broker_stop(&inst_);
    atomic_store(&stop_done, 1);
    pthread_mutex_lock(&stop_mu);
  }
  return NULL;
}

static void shutdown_now(void) {
  static pthread_t th;
  static int started;
  size_t i;
  int watching = 0;
  for (i = 0; i < nchans_; i++) watching |= chans_[i].watch_pending;
  if (!watching) { /* nothing to wait for: no second thread needed */
    broker_stop(&inst_);
    return;
  }
  if (!started) {
    CHECK(pthread_create(&th, NULL, stop_thread, NULL) == 0);
    started = 1;
  }
  atomic_store(&stop_done, 0);
  pthread_mutex_lock(&stop_mu);
  stop_asked = 1;
  pthread_cond_signal(&stop_cv);
  pthread_mutex_unlock(&stop_mu);
  while (!atomic_load(&stop_done)) {
    for (i = 0; i < nchans_; i++) {
      int pending;
      pthread_mutex_lock(&fz_mu);
      pending = chans_[i].watch_pending && chans_[i].destroyed;
      pthread_mutex_unlock(&fz_mu);
      if (pending) complete_watch(&chans_[i], 1);
    }
    sched_yield();
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int init;
  input in = {data, size};
  char err[256];
  unsigned cfgb;
  size_t i, rounds;
  int stopped = 0;
  if (!init) {
    grpc_init();
    init = 1;
  }
  memset(&inst_, 0, sizeof inst_);
  memset(streams_, 0, sizeof streams_);
  nstreams_ = nchans_ = live_calls = 0;
  rp_config_defaults(&inst_.cfg);
  cfgb = next(&in);
  inst_.cfg.broker.max_pending_per_stream = 1 + cfgb % 5;
  inst_.cfg.broker.max_subchannels = (cfgb >> 3) % 5;
  inst_.cfg.broker.max_streams = 1 + next(&in) % MAXS;
  inst_.cfg.broker.allow_unix = !(cfgb & 0x20);
  inst_.cfg.broker.allow_tcp = !(cfgb & 0x40);
  inst_.cfg.broker.allow_non_loopback = (cfgb & 0x80) && (next(&in) & 1);
  inst_.cfg.stdio.flush_deadline_ms = 0;
  loopback_only = !inst_.cfg.broker.allow_non_loopback;
  CHECK(broker_create(&inst_, err, sizeof err) == 0);

  while (in.n > 0) {
    unsigned op = next(&in) % 12;
    fz_stream *f = nstreams_ ? &streams_[next(&in) % nstreams_] : NULL;
    switch (op) {
      case 0: /* a client opens a stream: the module's own handler */
        if (nstreams_ < MAXS) stream_call(&inst_, NULL, NULL);
        break;
      case 1: case 2: case 3: /* a message arrives */
        if (f && f->c && atomic_load(&f->c->recv_op.busy) && !f->cancelled &&
            !f->half_closed_sent) {
          uint32_t id;
          need nd;
          grpc_byte_buffer *bb = make_request(&in, &id, &nd);
          if (f->nreq < MAXREQ)
            f->req[f->nreq++] = id;
          else
            f->req_overflow = 1;
          if (nd == NEEDS_ONE) f->must++;
          /* An advertisement is answered when refused, an answer when over
           * the pending limit. */
          if (nd != NEEDS_ONE) f->maybe++;
          deliver(f, bb);
        }
        break;
      case 4: /* the client half-closes */
        if (f && f->c && atomic_load(&f->c->recv_op.busy) && !f->cancelled &&
            !f->half_closed_sent) {
          f->half_closed_sent = 1;
          deliver(f, NULL);
        }
        break;
      case 5: case 6: /* a send, finish or close completes */
        if (f) step_stream(f, next(&in), next(&in) % 8 != 0);
        break;
      case 7: /* the client cancels */
        if (f && f->c && !f->status_sent) rp_call_cancel(f->c, 1, "client");
        break;
      case 8: case 9: { /* a connectivity watch completes */
        size_t j = nchans_ ? next(&in) % nchans_ : 0;
        unsigned how = next(&in) % 5;
        if (nchans_ && how == 4) { /* its target dies, or the link idles */
          pthread_mutex_lock(&fz_mu);
          if (!chans_[j].destroyed && chans_[j].state == GRPC_CHANNEL_READY)
            chans_[j].state = next(&in) & 1 ? GRPC_CHANNEL_IDLE
                                            : GRPC_CHANNEL_TRANSIENT_FAILURE;
          pthread_mutex_unlock(&fz_mu);
        } else if (nchans_ && chans_[j].watch_pending) {
          complete_watch(&chans_[j], how);
        }
        break;
      }
      case 10: { /* the host advertises */
        char addr[32];
        snprintf(addr, sizeof addr, "/tmp/h%u", next(&in));
        (void)rp_broker_advertise(&inst_, 1 + next(&in) % 8,
                                  next(&in) & 1 ? "unix" : "tcp", addr);
        break;
      }
      default: /* the module shuts down */
        if (!stopped && next(&in) % 4 == 0) {
          shutdown_now();
          stopped = 1;
        }
        break;
    }
  }

  /* Drain: every client half-closes (or its cancel fails its reads), and
   * every pending completion is delivered, until nothing is left. */
  for (rounds = 0;; rounds++) {
    int did = 0;
    CHECK(rounds < 100000);
    for (i = 0; i < nchans_; i++)
      if (chans_[i].watch_pending) {
        complete_watch(&chans_[i], (unsigned)(rounds + i) % 2);
        did = 1;
      }
    for (i = 0; i < nstreams_; i++) {
      fz_stream *f = &streams_[i];
      unsigned w;
      if (f->c && atomic_load(&f->c->recv_op.busy) && !f->cancelled &&
          !f->half_closed_sent) {
        f->half_closed_sent = 1;
        deliver(f, NULL);
        did = 1;
        continue;
      }
      for (w = 0; w < 4; w++)
        if (step_stream(f, w, 1)) did = 1;
    }
    if (!did) break;
  }
  for (i = 0; i < nstreams_; i++) {
    fz_stream *f = &streams_[i];
    check_order(f);
    if (!f->cancelled) {
      /* Half-closed and never cancelled: answered and ended with OK. */
      CHECK(f->c == NULL);
      CHECK(f->status_sent);
      if (!stopped && !f->req_overflow) {
        CHECK(f->nrep >= f->must);
        CHECK(f->nrep <= f->must + f->maybe);
      }
    }
  }
  /* A cancelled call the broker still holds goes when the module's
   * shutdown cancels its calls; everything else is gone already. */
  if (!stopped) shutdown_now();
  for (rounds = 0;; rounds++) {
    int did = 0;
    CHECK(rounds < 100000);
    for (i = 0; i < nstreams_; i++) {
      unsigned w;
      if (streams_[i].c) streams_[i].cancelled = 1;
      for (w = 0; w < 4; w++)
        if (step_stream(&streams_[i], w, 0)) did = 1;
    }
    if (!did) break;
  }
  CHECK(live_calls == 0);
  for (i = 0; i < nchans_; i++) CHECK(!chans_[i].watch_pending);
  broker_destroy(&inst_);
  for (i = 0; i < nchans_; i++) CHECK(chans_[i].destroyed);
  return 0;
}
