/*
 * rpb_server.c - the server side of the benchmarks, in three modes that
 * share one command protocol so the orchestrator (run.py) drives them, and
 * the anchors, the same way:
 *
 *   rpb_server module MANIFEST ADDR [POLLERS]
 *       a host: grpc_server + rpcplugin runtime + the module loaded through
 *       the loader from MANIFEST (what is measured);
 *   rpb_server transport ADDR
 *       anchor "transport limit" for stdio: a bare C-core server that
 *       answers StreamStdio with one pre-encoded StdioData written N times,
 *       one write in flight, no queue;
 *   rpb_server echo ADDR
 *       anchor "transport limit" for the broker: a bare C-core server that
 *       echoes every ConnInfo it receives on StartStream, no logic.
 *   rpb_server noop
 *       exit at once (W3 times exec -> exit of a program linked with the
 *       C core's shared libraries).
 *   rpb_server plugin
 *       anchor "C-core floor" for W3: the least a C-core go-plugin plugin
 *       does: grpc_init, a server on a unix socket in a fresh folder, the
 *       handshake line "1|1|unix|PATH|grpc" on stdout, and
 *       GRPCController/Shutdown answered with an empty message, after which
 *       it shuts the server down and exits 0.  No command protocol.
 *
 * Each mode listens on ADDR ("unix:/path"), prints "LISTEN ADDR PID" and
 * reads commands on stdin, one per line:
 *
 *   GO N SIZE     stdio: produce N chunks of SIZE bytes (module: a host
 *                 thread calls put_line; transport: N writes).  Answers
 *                 "PRODUCED T0 T1 OK DROPPED" (CLOCK_MONOTONIC ns) when the
 *                 last chunk was accepted (module) or written (transport).
 *   FLOOD N SIZE  module: as GO, sampling VmRSS every 1024 puts; answers
 *                 "FLOODED {json}".
 *   STATS         "STATS {json}": RSS, peak RSS, CPU, fds, module counters.
 *   STOP          graceful shutdown, then "BYE {json}" and exit 0.
 *
 * Pollers: the module runtime polls with POLLERS threads (default 1, the
 * runtime's default); the anchors with exactly one thread, so both sides
 * have the same number of threads on the completion queue.
 */
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <rpcplugin/host.h>

#include "bench_util.h"

enum { MODE_MODULE, MODE_TRANSPORT, MODE_ECHO, MODE_PLUGIN };

static int mode;
static grpc_server *server;
static grpc_completion_queue *cq; /* anchors only */
static pthread_t poller;

/* ------------------------------------------------------------ common */

typedef struct tag tag;
struct tag {
  void (*done)(tag *t, int ok);
};

static void *poller_main(void *arg) {
  (void)arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(
        cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE) ((tag *)ev.tag)->done(ev.tag, ev.success);
  }
  return NULL;
}

static int start(grpc_call *call, grpc_op *ops, size_t n, tag *t) {
  grpc_call_error e = grpc_call_start_batch(call, ops, n, t, NULL);
  if (e != GRPC_CALL_OK) {
    fprintf(stderr, "rpb_server: start_batch: %s\n",
            grpc_call_error_to_string(e));
    return -1;
  }
  return 0;
}

/* --------------------------------------------------------- module mode */

static rpcplugin_runtime *rt;
static rpcplugin_module *mod;
static rpcplugin_manifest *manifest;

typedef struct producer {
  pthread_t tid;
  int running;
  long n;
  size_t size;
  int flood;
} producer;
static producer prod;

static void on_log(void *ud, int level, const char *msg) {
  (void)ud;
  if (level <= RPCPLUGIN_LOG_WARN)
    fprintf(stderr, "[module %d] %s\n", level, msg);
}

static void *produce_main(void *arg) {
  producer *p = arg;
  char *buf = malloc(p->size);
  long i, ok = 0, dropped = 0, errors = 0;
  long rss_before = rpb_rss_kb(0), peak = rss_before;
  uint64_t t0, t1;
  size_t k;
  int last = 0;
  for (k = 0; k < p->size; k++) buf[k] = (char)('a' + k % 26);
  buf[p->size - 1] = '\n';
  t0 = rpb_now_ns();
  for (i = 0; i < p->n; i++) {
    int rc = rpcplugin_module_put_line(mod, RPCPLUGIN_STDOUT, buf, p->size);
    if (rc == 0)
      ok++;
    else if (rc == RPCPLUGIN_EDROPPED)
      dropped++;
    else {
      errors++;
      last = rc;
      if (rc == RPCPLUGIN_ESHUTDOWN) break;
    }
    if (p->flood && (i & 1023) == 0) {
      long r = rpb_rss_kb(0);
      if (r > peak) peak = r;
    }
  }
  t1 = rpb_now_ns();
  if (p->flood) {
    rpcplugin_stats s;
    long r = rpb_rss_kb(0);
    if (r > peak) peak = r;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    rpcplugin_module_get_stats(mod, &s);
    rpb_say(
        "FLOODED {\"t0\": %llu, \"t1\": %llu, \"ok\": %ld, "
        "\"dropped\": %ld, \"errors\": %ld, \"rss_before_kb\": %ld, "
        "\"rss_peak_sampled_kb\": %ld, \"rss_after_kb\": %ld, "
        "\"module_dropped_chunks\": %llu, \"module_queue_bytes\": %llu}",
        (unsigned long long)t0, (unsigned long long)t1, ok, dropped, errors,
        rss_before, peak, r, (unsigned long long)s.stdio_dropped_chunks,
        (unsigned long long)s.stdio_queue_bytes);
  } else {
    rpb_say("PRODUCED %llu %llu %ld %ld %ld %s", (unsigned long long)t0,
            (unsigned long long)t1, ok, dropped, errors,
            last ? rpcplugin_err_name(last) : "-");
  }
  free(buf);
  return NULL;
}

static int module_setup(const char *manifest_path, const char *addr,
                        unsigned pollers) {
  rpcplugin_runtime_options o;
  rpcplugin_error err;
  grpc_server_credentials *creds;
  int rc;
  rc = rpcplugin_manifest_load(manifest_path, &manifest, &err);
  if (rc) {
    fprintf(stderr, "rpb_server: %s\n", err.message);
    return -1;
  }
  server = grpc_server_create(NULL, NULL);
  creds = grpc_insecure_server_credentials_create();
  rc = grpc_server_add_http2_port(server, addr, creds) > 0 ? 0 : -1;
  grpc_server_credentials_release(creds);
  if (rc) {
    fprintf(stderr, "rpb_server: cannot listen on %s\n", addr);
    return -1;
  }
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = server;
  o.log = on_log;
  o.log_level = RPCPLUGIN_LOG_WARN;
  o.poll_threads = pollers;
  rc = rpcplugin_runtime_create(&o, &rt, &err);
  if (rc == 0) rc = rpcplugin_module_load(rt, manifest, NULL, &mod, &err);
  if (rc) {
    fprintf(stderr, "rpb_server: %s\n", err.message);
    return -1;
  }
  grpc_server_start(server);
  rc = rpcplugin_runtime_start(rt, &err);
  if (rc) {
    fprintf(stderr, "rpb_server: %s\n", err.message);
    return -1;
  }
  return 0;
}

static void module_go(long n, size_t size, int flood) {
  if (prod.running) pthread_join(prod.tid, NULL);
  prod.n = n;
  prod.size = size;
  prod.flood = flood;
  prod.running = pthread_create(&prod.tid, NULL, produce_main, &prod) == 0;
  if (!prod.running) rpb_say("ERR cannot start the producer");
}

static void module_stop(void) {
  rpcplugin_runtime_shutdown(rt);
  if (prod.running) pthread_join(prod.tid, NULL);
  prod.running = 0;
  rpcplugin_runtime_destroy(rt);
  grpc_server_destroy(server);
  rpcplugin_manifest_free(manifest);
}

/* ------------------------------------------------------ transport mode */

static pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER;

typedef struct tcall {
  tag request, md, write, close, status;
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array req_md;
  grpc_byte_buffer *payload;
  gpr_timespec deadline;
  int cancelled;
  int md_sent;
  int writing;
  int closed;
  long remaining;
  grpc_slice msg; /* the pre-encoded StdioData */
  uint64_t t0;
  int have_msg;
} tcall;
static tcall tc;
static void *method_handle;

static void t_write_done(tag *t, int ok);

/* Start the next write (under tmu); the caller checked remaining > 0. */
static void t_write_locked(void) {
  grpc_op op;
  grpc_slice s = tc.msg;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = grpc_raw_byte_buffer_create(&s, 1);
  tc.writing = 1;
  if (start(tc.call, &op, 1, &tc.write) != 0) {
    grpc_byte_buffer_destroy(op.data.send_message.send_message);
    tc.writing = 0;
    tc.remaining = 0;
    return;
  }
  tc.payload = op.data.send_message.send_message;
}

static void t_write_done(tag *t, int ok) {
  int done = 0;
  uint64_t t1 = 0;
  (void)t;
  pthread_mutex_lock(&tmu);
  grpc_byte_buffer_destroy(tc.payload);
  tc.payload = NULL;
  tc.writing = 0;
  if (!ok)
    tc.remaining = 0;
  else if (--tc.remaining > 0)
    t_write_locked();
  else {
    done = 1;
    t1 = rpb_now_ns();
  }
  pthread_mutex_unlock(&tmu);
  if (done)
    rpb_say("PRODUCED %llu %llu 0 0 0 -", (unsigned long long)tc.t0,
            (unsigned long long)t1);
}

static void t_md_done(tag *t, int ok) {
  (void)t;
  pthread_mutex_lock(&tmu);
  tc.md_sent = ok;
  if (ok && tc.remaining > 0 && !tc.writing) t_write_locked();
  pthread_mutex_unlock(&tmu);
}

static void t_close_done(tag *t, int ok) {
  (void)t;
  (void)ok;
  pthread_mutex_lock(&tmu);
  tc.closed = 1;
  pthread_mutex_unlock(&tmu);
}

static void t_nop(tag *t, int ok) {
  (void)t;
  (void)ok;
}

static void t_request_done(tag *t, int ok) {
  grpc_op ops[1];
  (void)t;
  if (!ok) return; /* server shutting down */
  if (tc.payload) {
    grpc_byte_buffer_destroy(tc.payload); /* google.protobuf.Empty */
    tc.payload = NULL;
  }
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[0].data.recv_close_on_server.cancelled = &tc.cancelled;
  start(tc.call, ops, 1, &tc.close);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  start(tc.call, ops, 1, &tc.md);
}

static void transport_go(long n, size_t size) {
  uint8_t *buf = malloc(size), *enc = malloc(size + 16);
  size_t k, len;
  for (k = 0; k < size; k++) buf[k] = (uint8_t)('a' + k % 26);
  buf[size - 1] = '\n';
  len = rpb_encode_stdio(enc, RPCPLUGIN_STDOUT, buf, size);
  pthread_mutex_lock(&tmu);
  if (tc.have_msg) grpc_slice_unref(tc.msg);
  tc.msg = grpc_slice_from_copied_buffer((const char *)enc, len);
  tc.have_msg = 1;
  tc.remaining = n;
  tc.t0 = rpb_now_ns();
  if (tc.md_sent && !tc.writing && tc.call) t_write_locked();
  pthread_mutex_unlock(&tmu);
  free(buf);
  free(enc);
}

/* --------------------------------------------------------- echo mode */

typedef struct ecall ecall;
struct ecall {
  tag request, md, recv, send, close, status;
  grpc_call *call;
  grpc_call_details details;
  grpc_metadata_array req_md;
  gpr_timespec deadline;
  grpc_byte_buffer *in, *out, *pending;
  int cancelled, sending, half_closed, finishing, dead;
  int ops; /* batches in flight */
};
static atomic_long echo_calls, echo_msgs;
static int echo_stopping;

static void e_request(void);

static void e_unref(ecall *c) {
  if (--c->ops > 0) return;
  if (c->call) grpc_call_unref(c->call);
  grpc_call_details_destroy(&c->details);
  grpc_metadata_array_destroy(&c->req_md);
  if (c->pending) grpc_byte_buffer_destroy(c->pending);
  free(c);
  atomic_fetch_sub(&echo_calls, 1);
}

static void e_op(ecall *c, grpc_op *ops, size_t n, tag *t) {
  c->ops++;
  if (start(c->call, ops, n, t) != 0) c->ops--;
}

static void e_send(ecall *c, grpc_byte_buffer *bb) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  c->out = bb;
  c->sending = 1;
  e_op(c, &op, 1, &c->send);
}

static void e_recv(ecall *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &c->in;
  e_op(c, &op, 1, &c->recv);
}

static void e_finish(ecall *c) {
  grpc_op op;
  if (c->finishing) return;
  c->finishing = 1;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  op.data.send_status_from_server.status = GRPC_STATUS_OK;
  e_op(c, &op, 1, &c->status);
}

#define ECALL_OF(t, field) ((ecall *)((char *)(t)-offsetof(ecall, field)))

static void e_recv_done(tag *t, int ok) {
  ecall *c = ECALL_OF(t, recv);
  grpc_byte_buffer *bb = c->in;
  c->in = NULL;
  if (!ok || bb == NULL) {
    if (bb) grpc_byte_buffer_destroy(bb);
    c->half_closed = 1;
    if (!c->sending && !c->dead) e_finish(c);
  } else {
    atomic_fetch_add(&echo_msgs, 1);
    if (c->dead) {
      grpc_byte_buffer_destroy(bb);
    } else if (c->sending) {
      c->pending = bb; /* resumes reading once the send is done */
    } else {
      e_send(c, bb);
      e_recv(c);
    }
  }
  e_unref(c);
}

static void e_send_done(tag *t, int ok) {
  ecall *c = ECALL_OF(t, send);
  grpc_byte_buffer_destroy(c->out);
  c->out = NULL;
  c->sending = 0;
  if (!ok) c->dead = 1;
  if (c->pending) {
    grpc_byte_buffer *bb = c->pending;
    c->pending = NULL;
    if (c->dead) {
      grpc_byte_buffer_destroy(bb);
    } else {
      e_send(c, bb);
      e_recv(c);
    }
  } else if (c->half_closed && !c->dead) {
    e_finish(c);
  }
  e_unref(c);
}

static void e_close_done(tag *t, int ok) {
  ecall *c = ECALL_OF(t, close);
  (void)ok;
  c->dead = 1;
  e_unref(c);
}

static void e_md_done(tag *t, int ok) {
  (void)ok;
  e_unref(ECALL_OF(t, md));
}

static void e_status_done(tag *t, int ok) {
  (void)ok;
  e_unref(ECALL_OF(t, status));
}

static void e_request_done(tag *t, int ok) {
  ecall *c = ECALL_OF(t, request);
  grpc_op op;
  if (!ok) { /* shutting down: the request came back unused */
    c->ops = 1;
    c->call = NULL;
    e_unref(c);
    return;
  }
  if (!echo_stopping) e_request();
  c->ops = 1; /* the stream's own reference, dropped below */
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->cancelled;
  e_op(c, &op, 1, &c->close);
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_INITIAL_METADATA;
  e_op(c, &op, 1, &c->md);
  e_recv(c);
  e_unref(c);
}

static void e_request(void) {
  ecall *c = calloc(1, sizeof *c);
  grpc_call_error e;
  c->request.done = e_request_done;
  c->md.done = e_md_done;
  c->recv.done = e_recv_done;
  c->send.done = e_send_done;
  c->close.done = e_close_done;
  c->status.done = e_status_done;
  grpc_call_details_init(&c->details);
  grpc_metadata_array_init(&c->req_md);
  atomic_fetch_add(&echo_calls, 1);
  e = grpc_server_request_registered_call(server, method_handle, &c->call,
                                          &c->deadline, &c->req_md, NULL, cq,
                                          cq, &c->request);
  if (e != GRPC_CALL_OK) {
    fprintf(stderr, "rpb_server: request_registered_call: %s\n",
            grpc_call_error_to_string(e));
    c->ops = 1;
    c->call = NULL;
    e_unref(c);
  }
}

/* ------------------------------------------------------ anchor setup */

/* A one-shot event a completion sets and a control thread waits for. */
typedef struct once_flag_ev {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done;
} once_flag_ev;
#define ONCE_FLAG_EV_INIT \
  {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0}

static void ev_set(once_flag_ev *e) {
  pthread_mutex_lock(&e->mu);
  e->done = 1;
  pthread_cond_broadcast(&e->cv);
  pthread_mutex_unlock(&e->mu);
}

static void ev_wait(once_flag_ev *e) {
  pthread_mutex_lock(&e->mu);
  while (!e->done) pthread_cond_wait(&e->cv, &e->mu);
  pthread_mutex_unlock(&e->mu);
}

static tag shutdown_tag;
static once_flag_ev sd_ev = ONCE_FLAG_EV_INIT;

static void shutdown_done(tag *t, int ok) {
  (void)t;
  (void)ok;
  ev_set(&sd_ev);
}

static int anchor_setup(const char *addr) {
  grpc_server_credentials *creds;
  int rc;
  server = grpc_server_create(NULL, NULL);
  cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(server, cq, NULL);
  if (mode == MODE_TRANSPORT)
    method_handle = grpc_server_register_method(
        server, "/plugin.GRPCStdio/StreamStdio", NULL,
        GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  else
    method_handle =
        grpc_server_register_method(server, "/plugin.GRPCBroker/StartStream",
                                    NULL, GRPC_SRM_PAYLOAD_NONE, 0);
  creds = grpc_insecure_server_credentials_create();
  rc = grpc_server_add_http2_port(server, addr, creds) > 0 ? 0 : -1;
  grpc_server_credentials_release(creds);
  if (rc) {
    fprintf(stderr, "rpb_server: cannot listen on %s\n", addr);
    return -1;
  }
  grpc_server_start(server);
  pthread_create(&poller, NULL, poller_main, NULL);
  if (mode == MODE_TRANSPORT) {
    grpc_call_error e;
    tc.request.done = t_request_done;
    tc.md.done = t_md_done;
    tc.write.done = t_write_done;
    tc.close.done = t_close_done;
    tc.status.done = t_nop;
    grpc_call_details_init(&tc.details);
    grpc_metadata_array_init(&tc.req_md);
    e = grpc_server_request_registered_call(server, method_handle, &tc.call,
                                            &tc.deadline, &tc.req_md,
                                            &tc.payload, cq, cq, &tc.request);
    if (e != GRPC_CALL_OK) return -1;
  } else {
    e_request();
  }
  return 0;
}

static void anchor_stop(void) {
  shutdown_tag.done = shutdown_done;
  echo_stopping = 1;
  grpc_server_shutdown_and_notify(server, cq, &shutdown_tag);
  grpc_server_cancel_all_calls(server);
  ev_wait(&sd_ev);
  grpc_completion_queue_shutdown(cq);
  pthread_join(poller, NULL);
  if (mode == MODE_TRANSPORT) {
    if (tc.call) grpc_call_unref(tc.call);
    if (tc.payload) grpc_byte_buffer_destroy(tc.payload);
    if (tc.have_msg) grpc_slice_unref(tc.msg);
    grpc_call_details_destroy(&tc.details);
    grpc_metadata_array_destroy(&tc.req_md);
  }
  grpc_server_destroy(server);
  grpc_completion_queue_destroy(cq);
}

/* ------------------------------------------------------- plugin mode */

typedef struct pcall {
  tag request, reply;
  grpc_call *call;
  gpr_timespec deadline;
  grpc_metadata_array req_md;
  grpc_byte_buffer *payload, *empty;
  int cancelled;
} pcall;
static pcall pc;
static once_flag_ev p_ev = ONCE_FLAG_EV_INIT;

static void p_reply_done(tag *t, int ok) {
  (void)t;
  (void)ok;
  ev_set(&p_ev);
}

static void p_request_done(tag *t, int ok) {
  grpc_op ops[4];
  grpc_slice empty = grpc_empty_slice();
  (void)t;
  if (!ok) return;
  memset(ops, 0, sizeof ops);
  pc.empty = grpc_raw_byte_buffer_create(&empty, 0);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = pc.empty;
  ops[2].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[2].data.send_status_from_server.status = GRPC_STATUS_OK;
  ops[3].op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  ops[3].data.recv_close_on_server.cancelled = &pc.cancelled;
  start(pc.call, ops, 4, &pc.reply);
}

static int plugin_main(void) {
  char dir[] = "/tmp/rpb-plugin-XXXXXX", path[64], addr[80];
  grpc_server_credentials *creds;
  if (mkdtemp(dir) == NULL) return 1;
  snprintf(path, sizeof path, "%s/plugin.sock", dir);
  snprintf(addr, sizeof addr, "unix:%s", path);
  server = grpc_server_create(NULL, NULL);
  cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(server, cq, NULL);
  method_handle = grpc_server_register_method(
      server, "/plugin.GRPCController/Shutdown", NULL,
      GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  creds = grpc_insecure_server_credentials_create();
  if (grpc_server_add_http2_port(server, addr, creds) <= 0) return 1;
  grpc_server_credentials_release(creds);
  grpc_server_start(server);
  pthread_create(&poller, NULL, poller_main, NULL);
  pc.request.done = p_request_done;
  pc.reply.done = p_reply_done;
  grpc_metadata_array_init(&pc.req_md);
  grpc_server_request_registered_call(server, method_handle, &pc.call,
                                      &pc.deadline, &pc.req_md, &pc.payload, cq,
                                      cq, &pc.request);
  printf("1|1|unix|%s|grpc\n", path);
  fflush(stdout);
  ev_wait(&p_ev);
  anchor_stop();
  if (pc.call) grpc_call_unref(pc.call);
  if (pc.payload) grpc_byte_buffer_destroy(pc.payload);
  if (pc.empty) grpc_byte_buffer_destroy(pc.empty);
  grpc_metadata_array_destroy(&pc.req_md);
  grpc_shutdown_blocking();
  unlink(path);
  rmdir(dir);
  return 0;
}

/* ------------------------------------------------------------- main */

static void stats_json(char *out, size_t len) {
  double u, s;
  long maxrss, vcs, ics;
  int n;
  rpb_cpu(&u, &s, &maxrss);
  rpb_ctxsw(&vcs, &ics);
  n = snprintf(out, len,
               "{\"rss_kb\": %ld, \"hwm_kb\": %ld, \"maxrss_kb\": %ld, "
               "\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"fds\": %d, "
               "\"ctxsw_vol\": %ld, \"ctxsw_invol\": %ld, \"t\": %llu",
               rpb_rss_kb(0), rpb_hwm_kb(0), maxrss, u, s, rpb_count_fds(0),
               vcs, ics, (unsigned long long)rpb_now_ns());
  if (mode == MODE_MODULE && mod) {
    rpcplugin_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    if (rpcplugin_module_get_stats(mod, &st) == 0)
      n += snprintf(out + n, len - (size_t)n,
                    ", \"sent_chunks\": %llu, \"sent_messages\": %llu, "
                    "\"sent_bytes\": %llu, \"dropped_chunks\": %llu, "
                    "\"queue_bytes\": %llu, \"blocked_puts\": %llu, "
                    "\"broker_streams\": %llu, \"broker_subchannels\": %llu, "
                    "\"broker_in\": %llu, \"broker_out\": %llu, "
                    "\"calls_active\": %llu",
                    (unsigned long long)st.stdio_sent_chunks,
                    (unsigned long long)st.stdio_sent_messages,
                    (unsigned long long)st.stdio_sent_bytes,
                    (unsigned long long)st.stdio_dropped_chunks,
                    (unsigned long long)st.stdio_queue_bytes,
                    (unsigned long long)st.stdio_blocked_puts,
                    (unsigned long long)st.broker_streams,
                    (unsigned long long)st.broker_subchannels,
                    (unsigned long long)st.broker_messages_in,
                    (unsigned long long)st.broker_messages_out,
                    (unsigned long long)st.calls_active);
  } else if (mode == MODE_ECHO) {
    n += snprintf(out + n, len - (size_t)n,
                  ", \"echo_calls\": %ld, \"echo_msgs\": %ld",
                  atomic_load(&echo_calls), atomic_load(&echo_msgs));
  }
  snprintf(out + n, len - (size_t)n, "}");
}

static void usage(void) {
  fprintf(stderr,
          "usage: rpb_server module MANIFEST ADDR [POLLERS]\n"
          "       rpb_server transport ADDR\n"
          "       rpb_server echo ADDR\n"
          "       rpb_server plugin\n");
}

int main(int argc, char **argv) {
  char line[256], js[2048];
  const char *addr;
  int rc;
  if (argc == 2 && strcmp(argv[1], "noop") == 0)
    return 0; /* W3's floor: exec and exit of a program linked to libgrpc */
  if (argc == 2 && strcmp(argv[1], "plugin") == 0) {
    mode = MODE_PLUGIN;
    grpc_init();
    return plugin_main();
  }
  if (argc < 3) {
    usage();
    return 2;
  }
  rpb_raise_nofile();
  if (strcmp(argv[1], "module") == 0 && argc >= 4) {
    mode = MODE_MODULE;
    addr = argv[3];
  } else if (strcmp(argv[1], "transport") == 0) {
    mode = MODE_TRANSPORT;
    addr = argv[2];
  } else if (strcmp(argv[1], "echo") == 0) {
    mode = MODE_ECHO;
    addr = argv[2];
  } else {
    usage();
    return 2;
  }
  grpc_init();
  if (mode == MODE_MODULE)
    rc = module_setup(argv[2], addr, argc >= 5 ? (unsigned)atoi(argv[4]) : 1u);
  else
    rc = anchor_setup(addr);
  if (rc) {
    rpb_say("ERR setup failed");
    return 1;
  }
  rpb_say("LISTEN %s %d", addr, (int)getpid());

  while (fgets(line, sizeof line, stdin)) {
    long n = 0;
    unsigned long size = 0;
    if (sscanf(line, "GO %ld %lu", &n, &size) == 2 && n > 0 && size > 0) {
      if (mode == MODE_MODULE)
        module_go(n, size, 0);
      else if (mode == MODE_TRANSPORT)
        transport_go(n, size);
      else
        rpb_say("ERR GO needs module or transport mode");
    } else if (sscanf(line, "FLOOD %ld %lu", &n, &size) == 2 && n > 0 &&
               size > 0 && mode == MODE_MODULE) {
      module_go(n, size, 1);
    } else if (strncmp(line, "STATS", 5) == 0) {
      stats_json(js, sizeof js);
      rpb_say("STATS %s", js);
    } else if (strncmp(line, "STOP", 4) == 0) {
      break;
    } else {
      rpb_say("ERR unknown command");
    }
  }
  {
    uint64_t t0 = rpb_now_ns(), t1;
    stats_json(js, sizeof js);
    if (mode == MODE_MODULE)
      module_stop();
    else
      anchor_stop();
    t1 = rpb_now_ns();
    grpc_shutdown_blocking();
    rpb_say("BYE {\"shutdown_ms\": %.3f, \"before\": %s}", (t1 - t0) / 1e6, js);
  }
  return 0;
}
