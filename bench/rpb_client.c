/*
 * rpb_client.c - the one C-core client of the benchmarks.  Every server
 * (the module, the bare C-core anchors, the gRPC C++ anchor, the Python
 * seed) is read or driven by this same program, in its own process, so a
 * ratio compares servers and never clients.
 *
 *   rpb_client stdio TARGET EXPECTED_BYTES
 *       W1: open StreamStdio, print "READY" once the request is out, read
 *       until EXPECTED_BYTES of StdioData.data arrived, print
 *       "DONE {json}" (t_end is CLOCK_MONOTONIC, comparable with the
 *       server's t0), cancel.
 *   rpb_client stall TARGET
 *       W6: open StreamStdio and never read; "READY", then wait for a line
 *       (or EOF) on stdin and cancel.
 *   rpb_client broker TARGET [--echo] [--server-pid P] [--live PATH]
 *                     [--anchor ADDR --anchor-pid P]
 *                     [--rtt N] [--open N] [--pipeline N]
 *                     [--streams N] [--subchannels N]
 *       W4 / W6: the broker workloads against the module (or, with --echo,
 *       against the echo anchor, which answers every message with itself);
 *       --anchor runs the same workloads on the echo anchor, alternating
 *       with the module; --live PATH runs a bare C-core server on
 *       unix:PATH in this process as the target of knock-opens and of the
 *       bare connect anchor (timed right after each knock-open).
 *       Prints "RESULT {json}".
 *   rpb_client lifecycle N -- CMD [ARG...]
 *       W3: N times: exec CMD, read go-plugin's handshake line, connect,
 *       call GRPCController/Shutdown, wait for the process to exit.
 *   rpb_client exectime N -- CMD [ARG...]
 *       W3's floor: exec -> exit of CMD, N times.
 *   rpb_client w2 N_LINES LINE_BYTES -- CMD [ARG...]
 *       W2 with this client: exec CMD (a host whose child prints the
 *       lines), read the handshake, read StreamStdio until every byte of
 *       stdout arrived, then Shutdown.
 *
 * Every wait is bounded (RPB_TIMEOUT_MS, default 60 s); a timeout prints
 * "ERR ..." and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <pthread.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "bench_util.h"

extern char **environ;

static long timeout_ms = 60000;

static void die(const char *what) {
  rpb_say("ERR %s", what);
  exit(1);
}

/* ------------------------------------------------------------ events */

typedef struct ev_op {
  int done, ok;
  uint64_t t;
} ev_op;

static grpc_completion_queue *cq;

/* Handle one event: mark its op done.  Returns the op. */
static ev_op *next_event(void) {
  grpc_event ev =
      grpc_completion_queue_next(cq, rpb_deadline_ms(timeout_ms), NULL);
  ev_op *o;
  if (ev.type == GRPC_QUEUE_TIMEOUT) die("timeout waiting for the server");
  if (ev.type != GRPC_OP_COMPLETE) die("completion queue shut down");
  o = ev.tag;
  o->done = 1;
  o->ok = ev.success;
  o->t = rpb_now_ns();
  return o;
}

static void wait_op(ev_op *o) {
  while (!o->done) next_event();
}

static void batch(grpc_call *call, grpc_op *ops, size_t n, ev_op *o) {
  grpc_call_error e;
  o->done = o->ok = 0;
  e = grpc_call_start_batch(call, ops, n, o, NULL);
  if (e != GRPC_CALL_OK) die(grpc_call_error_to_string(e));
}

static grpc_channel *make_channel(const char *target, int local_pool) {
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  grpc_arg arg;
  grpc_channel_args args;
  grpc_channel *ch;
  arg.type = GRPC_ARG_INTEGER;
  arg.key = (char *)"grpc.use_local_subchannel_pool";
  arg.value.integer = 1;
  args.num_args = 1;
  args.args = &arg;
  ch = grpc_channel_create(target, creds, local_pool ? &args : NULL);
  grpc_channel_credentials_release(creds);
  return ch;
}

/* Wait until ch is READY; returns 0, or -1 on failure/timeout. */
static int wait_ready(grpc_channel *ch, long ms) {
  grpc_completion_queue *wq = grpc_completion_queue_create_for_pluck(NULL);
  gpr_timespec dl = rpb_deadline_ms(ms);
  grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch, 1);
  int rc = 0;
  while (st != GRPC_CHANNEL_READY) {
    grpc_event ev;
    if (st == GRPC_CHANNEL_SHUTDOWN) {
      rc = -1;
      break;
    }
    grpc_channel_watch_connectivity_state(ch, st, dl, wq, (void *)1);
    ev = grpc_completion_queue_pluck(wq, (void *)1,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (!ev.success) {
      rc = -1;
      break;
    }
    st = grpc_channel_check_connectivity_state(ch, 1);
  }
  grpc_completion_queue_shutdown(wq);
  while (grpc_completion_queue_pluck(wq, NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
             .type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(wq);
  return rc;
}

/* ------------------------------------------------------------ streams */

typedef struct stream {
  grpc_call *call;
  ev_op md, rmd, send, recv, close, status;
  grpc_byte_buffer *in, *out;
  grpc_metadata_array imd, tmd;
  grpc_status_code code;
  grpc_slice details;
} stream;

static void stream_open(stream *s, grpc_channel *ch, const char *method,
                        grpc_byte_buffer *request, int half_close) {
  grpc_op ops[3];
  size_t n = 0;
  memset(s, 0, sizeof *s);
  grpc_metadata_array_init(&s->imd);
  grpc_metadata_array_init(&s->tmd);
  s->call = grpc_channel_create_call(
      ch, NULL, 0, cq, grpc_slice_from_static_string(method), NULL,
      gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  memset(ops, 0, sizeof ops);
  ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
  if (request) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = request;
  }
  if (half_close) ops[n++].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  batch(s->call, ops, n, &s->md);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[0].data.recv_initial_metadata.recv_initial_metadata = &s->imd;
  batch(s->call, ops, 1, &s->rmd);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[0].data.recv_status_on_client.trailing_metadata = &s->tmd;
  ops[0].data.recv_status_on_client.status = &s->code;
  ops[0].data.recv_status_on_client.status_details = &s->details;
  batch(s->call, ops, 1, &s->status);
}

static void stream_send(stream *s, grpc_byte_buffer *bb) {
  grpc_op op;
  if (s->out) grpc_byte_buffer_destroy(s->out);
  s->out = bb;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  batch(s->call, &op, 1, &s->send);
}

static void stream_recv(stream *s) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &s->in;
  batch(s->call, &op, 1, &s->recv);
}

static void stream_half_close(stream *s) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  batch(s->call, &op, 1, &s->close);
}

/* ---------------------------------------------------------------- stdio */

static int cmd_stdio(const char *target, unsigned long long expected,
                     int stall) {
  grpc_channel *ch = make_channel(target, 0);
  grpc_slice empty = grpc_empty_slice();
  stream s;
  unsigned long long bytes = 0, msgs = 0, bad = 0;
  uint64_t t_first = 0, t_end = 0, t_ready;
  double u, sy;
  long maxrss;

  stream_open(&s, ch, "/plugin.GRPCStdio/StreamStdio",
              grpc_raw_byte_buffer_create(&empty, 0), 1);
  wait_op(&s.md);
  if (!s.md.ok) die("cannot start StreamStdio");
  t_ready = rpb_now_ns();
  rpb_say("READY %llu", (unsigned long long)t_ready);
  if (stall) {
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) {
    }
  } else {
    while (bytes < expected) {
      long n;
      stream_recv(&s);
      wait_op(&s.recv);
      if (!s.recv.ok || s.in == NULL) break;
      n = rpb_stdio_data_len(s.in, NULL);
      if (n < 0)
        bad++;
      else
        bytes += (unsigned long long)n;
      if (msgs++ == 0) t_first = s.recv.t;
      grpc_byte_buffer_destroy(s.in);
      s.in = NULL;
    }
    t_end = rpb_now_ns();
  }
  grpc_call_cancel(s.call, NULL);
  wait_op(&s.status);
  wait_op(&s.rmd);
  if (s.in) grpc_byte_buffer_destroy(s.in);
  s.in = NULL;
  grpc_metadata_array_destroy(&s.imd);
  grpc_metadata_array_destroy(&s.tmd);
  grpc_slice_unref(s.details);
  grpc_call_unref(s.call);
  grpc_channel_destroy(ch);
  rpb_cpu(&u, &sy, &maxrss);
  if (!stall)
    rpb_say(
        "DONE {\"bytes\": %llu, \"messages\": %llu, \"bad\": %llu, "
        "\"complete\": %s, \"t_ready\": %llu, \"t_first\": %llu, "
        "\"t_end\": %llu, \"cpu_user\": %.6f, \"cpu_sys\": %.6f, "
        "\"maxrss_kb\": %ld}",
        bytes, msgs, bad, bytes >= expected ? "true" : "false",
        (unsigned long long)t_ready, (unsigned long long)t_first,
        (unsigned long long)t_end, u, sy, maxrss);
  else
    rpb_say("DONE {}");
  return bytes >= expected || stall ? 0 : 1;
}

/* ------------------------------------------------------------- broker */

/* The live target: a bare C-core server with no methods, polled by its own
 * thread, so a knock-open has something real to connect to. */
static grpc_server *live_server;
static grpc_completion_queue *live_cq;
static pthread_t live_tid;

static void *live_main(void *arg) {
  (void)arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(
        live_cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
  }
  return NULL;
}

static void live_start(const char *path) {
  char addr[300];
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  live_server = grpc_server_create(NULL, NULL);
  live_cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(live_server, live_cq, NULL);
  snprintf(addr, sizeof addr, "unix:%s", path);
  unlink(path);
  if (grpc_server_add_http2_port(live_server, addr, creds) <= 0)
    die("cannot listen on the live target");
  grpc_server_credentials_release(creds);
  grpc_server_start(live_server);
  pthread_create(&live_tid, NULL, live_main, NULL);
}

static void live_stop(void) {
  if (!live_server) return;
  grpc_server_shutdown_and_notify(live_server, live_cq, NULL);
  grpc_server_cancel_all_calls(live_server);
  grpc_completion_queue_shutdown(live_cq);
  pthread_join(live_tid, NULL);
  grpc_server_destroy(live_server);
  grpc_completion_queue_destroy(live_cq);
  live_server = NULL;
}

typedef struct bopts {
  int echo;
  int server_pid, anchor_pid;
  const char *live, *anchor;
  long rtt, open, pipeline, streams, subchannels;
} bopts;

static grpc_byte_buffer *knock_msg(uint32_t id, int knock, const char *live) {
  rpb_conninfo m;
  memset(&m, 0, sizeof m);
  m.service_id = id;
  m.has_knock = 1;
  m.knock = knock;
  if (knock) {
    m.network = "unix";
    m.address = live;
  }
  return rpb_encode_conninfo(&m);
}

/* One sequential round trip on s; returns microseconds, and checks the
 * reply against want_ack (-1: do not check). */
static double round_trip(stream *s, grpc_byte_buffer *msg, int want_ack,
                         long *bad) {
  uint64_t t0 = rpb_now_ns();
  stream_recv(s);
  stream_send(s, msg);
  wait_op(&s->recv);
  wait_op(&s->send);
  if (!s->recv.ok || s->in == NULL) die("broker stream ended");
  if (want_ack >= 0) {
    uint32_t id;
    int ack, err;
    if (rpb_decode_reply(s->in, &id, &ack, &err) != 0 || ack != want_ack ||
        (want_ack == 1 && err))
      (*bad)++;
  }
  grpc_byte_buffer_destroy(s->in);
  s->in = NULL;
  return (s->recv.t - t0) / 1e3;
}

static void print_dist(char **p, size_t *left, const char *name, double *v,
                       size_t n) {
  double sum = 0;
  size_t i;
  int k;
  for (i = 0; i < n; i++) sum += v[i];
  {
    double p50 = rpb_quantile(v, n, 0.50), p99 = rpb_quantile(v, n, 0.99);
    k = snprintf(*p, *left,
                 "\"%s\": {\"n\": %zu, \"p50_us\": %.2f, \"p99_us\": %.2f, "
                 "\"min_us\": %.2f, \"max_us\": %.2f, \"mean_us\": %.2f}, ",
                 name, n, p50, p99, n ? v[0] : 0, n ? v[n - 1] : 0,
                 n ? sum / (double)n : 0);
  }
  if (k > 0 && (size_t)k < *left) {
    *p += k;
    *left -= (size_t)k;
  }
}

static void add_json(char **p, size_t *left, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void add_json(char **p, size_t *left, const char *fmt, ...) {
  va_list ap;
  int k;
  va_start(ap, fmt);
  k = vsnprintf(*p, *left, fmt, ap);
  va_end(ap);
  if (k > 0 && (size_t)k < *left) {
    *p += k;
    *left -= (size_t)k;
  }
}

/* Pipelined: n messages with one send and one receive always in flight.
 * Returns seconds. */
static double pipelined(stream *s, long n, const char *live) {
  long sent = 0, got = 0;
  uint64_t t0 = rpb_now_ns();
  stream_recv(s);
  stream_send(s, knock_msg(1, 1, live));
  sent = 1;
  while (got < n) {
    ev_op *e = next_event();
    if (e == &s->send) {
      if (!e->ok) die("pipelined send failed");
      if (sent < n) {
        stream_send(s, knock_msg(1, 1, live));
        sent++;
      }
    } else if (e == &s->recv) {
      if (!e->ok || s->in == NULL) die("pipelined stream ended");
      grpc_byte_buffer_destroy(s->in);
      s->in = NULL;
      if (++got < n) stream_recv(s);
    }
  }
  wait_op(&s->send);
  return (rpb_now_ns() - t0) / 1e9;
}

/* n concurrent streams on ch, one round trip each; server RSS figures. */
static void many_streams(grpc_channel *ch, long n, int pid, const char *live,
                         const char *name, char **p, size_t *left) {
  stream *ss = calloc((size_t)n, sizeof *ss);
  long rss0 = rpb_rss_kb(pid), rss1, replies = 0, i;
  uint64_t t0 = rpb_now_ns(), t1;
  for (i = 0; i < n; i++) {
    stream_open(&ss[i], ch, "/plugin.GRPCBroker/StartStream", NULL, 0);
    stream_recv(&ss[i]);
    stream_send(&ss[i], knock_msg(1, 1, live));
  }
  for (i = 0; i < n; i++) {
    wait_op(&ss[i].recv);
    wait_op(&ss[i].send);
    if (ss[i].recv.ok && ss[i].in) replies++;
    if (ss[i].in) grpc_byte_buffer_destroy(ss[i].in);
    ss[i].in = NULL;
  }
  t1 = rpb_now_ns();
  usleep(100000);
  rss1 = rpb_rss_kb(pid);
  for (i = 0; i < n; i++) stream_half_close(&ss[i]);
  for (i = 0; i < n; i++) {
    wait_op(&ss[i].close);
    wait_op(&ss[i].status);
    wait_op(&ss[i].md);
    wait_op(&ss[i].rmd);
    grpc_metadata_array_destroy(&ss[i].imd);
    grpc_metadata_array_destroy(&ss[i].tmd);
    grpc_slice_unref(ss[i].details);
    if (ss[i].out) grpc_byte_buffer_destroy(ss[i].out);
    grpc_call_unref(ss[i].call);
  }
  usleep(100000);
  add_json(p, left,
           "\"%s\": {\"n\": %ld, \"replies\": %ld, "
           "\"open_seconds\": %.6f, \"server_rss_before_kb\": %ld, "
           "\"server_rss_open_kb\": %ld, \"server_rss_closed_kb\": %ld}, ",
           name, n, replies, (t1 - t0) / 1e9, rss0, rss1, rpb_rss_kb(pid));
  free(ss);
}

static void stream_close(stream *s) {
  stream_half_close(s);
  wait_op(&s->close);
  wait_op(&s->status);
  wait_op(&s->rmd);
  grpc_metadata_array_destroy(&s->imd);
  grpc_metadata_array_destroy(&s->tmd);
  grpc_slice_unref(s->details);
  if (s->out) grpc_byte_buffer_destroy(s->out);
  if (s->in) grpc_byte_buffer_destroy(s->in);
  grpc_call_unref(s->call);
}

/*
 * The broker workloads.  With --anchor ADDR (the echo server) every
 * measurement alternates between the two servers at the finest grain that
 * keeps it meaningful (each round trip; blocks of a tenth of the pipelined
 * run), so both see the same moments of a shared machine.
 */
static int cmd_broker(const char *target, const bopts *o) {
  static char out[16384];
  char *p = out;
  size_t left = sizeof out;
  grpc_channel *ch = make_channel(target, 0), *ach = NULL;
  stream s, as;
  long bad = 0, i, warm;
  const uint32_t open_id = 1, unknown_id = 999999;
  const int check = o->echo ? -1 : 1, check0 = o->echo ? -1 : 0;
  long nmax = o->rtt;
  double *rk, *cu, *ark, *acu;

  if (o->open > nmax) nmax = o->open;
  nmax = nmax > 0 ? nmax : 1;
  rk = calloc((size_t)nmax, sizeof(double));
  cu = calloc((size_t)nmax, sizeof(double));
  ark = calloc((size_t)nmax, sizeof(double));
  acu = calloc((size_t)nmax, sizeof(double));
  if (o->live) live_start(o->live);
  if (wait_ready(ch, timeout_ms) != 0) die("cannot connect to the server");
  stream_open(&s, ch, "/plugin.GRPCBroker/StartStream", NULL, 0);
  wait_op(&s.md);
  if (!s.md.ok) die("cannot start StartStream");
  if (o->anchor) {
    ach = make_channel(o->anchor, 0);
    if (wait_ready(ach, timeout_ms) != 0) die("cannot connect to the anchor");
    stream_open(&as, ach, "/plugin.GRPCBroker/StartStream", NULL, 0);
    wait_op(&as.md);
    if (!as.md.ok) die("cannot start StartStream on the anchor");
  }
  add_json(&p, &left, "{");

  /* Setup: subchannel open_id, which the no-connect re-knocks hit. */
  if (!o->echo) {
    long b0 = 0;
    if (!o->live) die("--live PATH is needed against the module");
    round_trip(&s, knock_msg(open_id, 1, o->live), 1, &b0);
    if (b0) die("cannot open the setup subchannel");
  }

  /* No-connect round trips, sequential; the two kinds (and the anchor)
   * alternate, after a warm-up that lets the connections settle (HTTP/2
   * BDP probes and window updates are frequent on a young connection). */
  if (o->rtt > 0) {
    warm = o->rtt / 10 > 1000 ? o->rtt / 10 : 1000;
    for (i = 0; i < warm + o->rtt; i++) {
      long k = i - warm;
      double a = round_trip(&s, knock_msg(open_id, 1, o->live), check, &bad);
      double b = round_trip(&s, knock_msg(unknown_id, 0, NULL), check0, &bad);
      double c = 0, d = 0;
      if (o->anchor) {
        c = round_trip(&as, knock_msg(open_id, 1, o->live), -1, &bad);
        d = round_trip(&as, knock_msg(unknown_id, 0, NULL), -1, &bad);
      }
      if (k >= 0) {
        rk[k] = a;
        cu[k] = b;
        ark[k] = c;
        acu[k] = d;
      }
    }
    print_dist(&p, &left, "reknock", rk, (size_t)o->rtt);
    print_dist(&p, &left, "close_unknown", cu, (size_t)o->rtt);
    if (o->anchor) {
      print_dist(&p, &left, "anchor_reknock", ark, (size_t)o->rtt);
      print_dist(&p, &left, "anchor_close_unknown", acu, (size_t)o->rtt);
    }
  }

  /* Knock-open of a new id, sequential, each followed by its close (timed
   * as close_open, so the subchannel bound is never reached) and by the
   * anchor: a bare C-core channel's connect-to-READY to the same live
   * target, with the module's channel arguments. */
  if (o->open > 0 && !o->echo) {
    char t[300];
    snprintf(t, sizeof t, "unix:%s", o->live);
    for (i = 0; i < o->open; i++) {
      uint32_t id = 100000 + (uint32_t)i;
      uint64_t t0;
      grpc_channel *c2;
      rk[i] = round_trip(&s, knock_msg(id, 1, o->live), 1, &bad);
      cu[i] = round_trip(&s, knock_msg(id, 0, NULL), 1, &bad);
      t0 = rpb_now_ns();
      c2 = make_channel(t, 1);
      if (wait_ready(c2, 5000) != 0) die("bare connect failed");
      ark[i] = (rpb_now_ns() - t0) / 1e3;
      grpc_channel_destroy(c2);
    }
    print_dist(&p, &left, "knock_open", rk, (size_t)o->open);
    print_dist(&p, &left, "close_open", cu, (size_t)o->open);
    print_dist(&p, &left, "bare_connect", ark, (size_t)o->open);
  }

  /* Pipelined, in ten alternating blocks. */
  if (o->pipeline > 0) {
    double tm = 0, ta = 0;
    long blk = o->pipeline / 10 > 0 ? o->pipeline / 10 : 1, done = 0;
    pipelined(&s, blk / 10 + 1, o->live); /* warm-up */
    if (o->anchor) pipelined(&as, blk / 10 + 1, o->live);
    while (done < o->pipeline) {
      long k = o->pipeline - done < blk ? o->pipeline - done : blk;
      tm += pipelined(&s, k, o->live);
      if (o->anchor) ta += pipelined(&as, k, o->live);
      done += k;
    }
    add_json(&p, &left,
             "\"pipelined\": {\"n\": %ld, \"seconds\": %.6f, "
             "\"msgs_per_s\": %.1f}, ",
             o->pipeline, tm, o->pipeline / tm);
    if (o->anchor)
      add_json(&p, &left,
               "\"anchor_pipelined\": {\"n\": %ld, \"seconds\": %.6f, "
               "\"msgs_per_s\": %.1f}, ",
               o->pipeline, ta, o->pipeline / ta);
  }

  /* W6: N subchannels open at once, twice (RSS after the second close
   * tells allocator retention from growth). */
  if (o->subchannels > 0 && !o->echo) {
    long rss0 = rpb_rss_kb(o->server_pid), rss1, rss2, rss3, fd0, fd1;
    uint64_t t0, t1 = 0;
    int round;
    fd0 = rpb_count_fds(o->server_pid);
    rss1 = rss2 = 0;
    fd1 = 0;
    for (round = 0; round < 2; round++) {
      t0 = rpb_now_ns();
      for (i = 0; i < o->subchannels; i++)
        round_trip(&s, knock_msg(200000 + (uint32_t)i, 1, o->live), 1, &bad);
      if (round == 0) t1 = rpb_now_ns() - t0;
      usleep(200000); /* let the connections settle */
      if (round == 0) {
        rss1 = rpb_rss_kb(o->server_pid);
        fd1 = rpb_count_fds(o->server_pid);
      }
      for (i = 0; i < o->subchannels; i++)
        round_trip(&s, knock_msg(200000 + (uint32_t)i, 0, NULL), 1, &bad);
      usleep(200000);
      if (round == 0) rss2 = rpb_rss_kb(o->server_pid);
    }
    rss3 = rpb_rss_kb(o->server_pid);
    add_json(&p, &left,
             "\"subchannels\": {\"n\": %ld, \"open_seconds\": %.6f, "
             "\"server_rss_before_kb\": %ld, \"server_rss_open_kb\": %ld, "
             "\"server_rss_closed_kb\": %ld, "
             "\"server_rss_closed_again_kb\": %ld, "
             "\"server_fds_before\": %ld, "
             "\"server_fds_open\": %ld, \"server_fds_closed\": %d}, ",
             o->subchannels, t1 / 1e9, rss0, rss1, rss2, rss3, fd0, fd1,
             rpb_count_fds(o->server_pid));
  }

  if (o->streams > 0) {
    many_streams(ch, o->streams, o->server_pid, o->live, "streams", &p, &left);
    if (o->anchor)
      many_streams(ach, o->streams, o->anchor_pid, o->live, "anchor_streams",
                   &p, &left);
  }

  stream_close(&s);
  grpc_channel_destroy(ch);
  if (o->anchor) {
    stream_close(&as);
    grpc_channel_destroy(ach);
  }
  live_stop();
  add_json(&p, &left, "\"bad_replies\": %ld}", bad);
  rpb_say("RESULT %s", out);
  free(rk);
  free(cu);
  free(ark);
  free(acu);
  return 0;
}

/* ---------------------------------------------------------- processes */

typedef struct child {
  pid_t pid;
  int out; /* read end of its stdout */
  int pidfd;
} child;

static int spawn(child *c, char **argv) {
  int fds[2];
  posix_spawn_file_actions_t fa;
  int rc;
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  if (!getenv("RPB_VERBOSE"))
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  rc = posix_spawnp(&c->pid, argv[0], &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    return -1;
  }
  c->out = fds[0];
  c->pidfd = (int)syscall(SYS_pidfd_open, c->pid, 0);
  return 0;
}

/* Read the first line of c's stdout; 0 or -1. */
static int read_line(child *c, char *buf, size_t len, long ms) {
  size_t n = 0;
  uint64_t end = rpb_now_ns() + (uint64_t)ms * 1000000ull;
  while (n + 1 < len) {
    struct pollfd pf = {c->out, POLLIN, 0};
    long left = (long)((end - rpb_now_ns()) / 1000000ull);
    ssize_t k;
    if (rpb_now_ns() >= end || poll(&pf, 1, (int)left + 1) <= 0) return -1;
    k = read(c->out, buf + n, 1);
    if (k <= 0) return -1;
    if (buf[n] == '\n') {
      buf[n] = '\0';
      return 0;
    }
    n++;
  }
  return -1;
}

/* Wait for c to exit; returns the time it was seen gone, 0 on timeout
 * (then it is killed). */
static uint64_t reap(child *c, long ms, int *status) {
  uint64_t t = 0;
  if (c->pidfd >= 0) {
    struct pollfd pf = {c->pidfd, POLLIN, 0};
    if (poll(&pf, 1, (int)ms) == 1) t = rpb_now_ns();
  } else {
    uint64_t end = rpb_now_ns() + (uint64_t)ms * 1000000ull;
    while (rpb_now_ns() < end) {
      if (waitpid(c->pid, status, WNOHANG) == c->pid) {
        t = rpb_now_ns();
        c->pid = 0;
        break;
      }
      usleep(50);
    }
  }
  if (t == 0 && c->pid) kill(c->pid, SIGKILL);
  if (c->pid) waitpid(c->pid, status, 0);
  if (c->pidfd >= 0) close(c->pidfd);
  close(c->out);
  return t;
}

/* "1|APP|NETWORK|ADDRESS|grpc" -> a gRPC target. */
static int handshake_target(const char *line, char *target, size_t len) {
  char copy[1024], *f[6], *save = NULL, *tok;
  int n = 0;
  snprintf(copy, sizeof copy, "%s", line);
  for (tok = strtok_r(copy, "|", &save); tok && n < 6;
       tok = strtok_r(NULL, "|", &save))
    f[n++] = tok;
  if (n < 5) return -1;
  if (strcmp(f[2], "unix") == 0)
    snprintf(target, len, "unix:%s", f[3]);
  else if (f[3][0] == '[')
    snprintf(target, len, "ipv6:%s", f[3]);
  else
    snprintf(target, len, "ipv4:%s", f[3]);
  return 0;
}

/* Start the plugin command, read its handshake line and make a channel to
 * the address it announces (not yet connected).  Dies on failure. */
static grpc_channel *launch(child *c, char **argv, char *line, size_t linelen,
                            char *target, size_t tlen) {
  int status = 0;
  if (spawn(c, argv) != 0) die("cannot spawn the plugin command");
  if (read_line(c, line, linelen, 10000) != 0 ||
      handshake_target(line, target, tlen) != 0) {
    reap(c, 0, &status);
    die("no handshake line from the plugin command");
  }
  return make_channel(target, 0);
}

/* A unary call with an empty request; returns the status code. */
static int unary_empty(grpc_channel *ch, const char *method) {
  stream s;
  grpc_slice empty = grpc_empty_slice();
  stream_open(&s, ch, method, grpc_raw_byte_buffer_create(&empty, 0), 1);
  stream_recv(&s);
  wait_op(&s.status);
  wait_op(&s.md);
  wait_op(&s.rmd);
  wait_op(&s.recv);
  if (s.in) grpc_byte_buffer_destroy(s.in);
  grpc_metadata_array_destroy(&s.imd);
  grpc_metadata_array_destroy(&s.tmd);
  grpc_slice_unref(s.details);
  grpc_call_unref(s.call);
  return (int)s.code;
}

static void dist_line(char **p, size_t *left, const char *name, double *v,
                      size_t n) {
  print_dist(p, left, name, v, n);
}

static int cmd_lifecycle(long n, char **argv) {
  static char out[8192];
  char *p = out, line[1024], target[1100];
  size_t left = sizeof out;
  double *hs = calloc((size_t)n, sizeof(double));
  double *ready = calloc((size_t)n, sizeof(double));
  double *rtt = calloc((size_t)n, sizeof(double));
  double *exit_after = calloc((size_t)n, sizeof(double));
  double *kill_us = calloc((size_t)n, sizeof(double));
  long i, failures = 0, nonzero = 0, not_ok = 0;
  int last_code = 0;
  for (i = 0; i < n; i++) {
    child c;
    grpc_channel *ch;
    uint64_t t0, t_hs, t_ready, t_s0, t_s1, t_exit;
    int code, status = 0;
    t0 = rpb_now_ns();
    ch = launch(&c, argv, line, sizeof line, target, sizeof target);
    t_hs = rpb_now_ns();
    if (wait_ready(ch, 10000) != 0) die("cannot connect to the plugin");
    t_ready = rpb_now_ns();
    t_s0 = rpb_now_ns();
    code = unary_empty(ch, "/plugin.GRPCController/Shutdown");
    t_s1 = rpb_now_ns();
    if (code != 0) {
      not_ok++; /* the reply may race the server's own teardown */
      last_code = code;
    }
    t_exit = reap(&c, 10000, &status);
    grpc_channel_destroy(ch);
    if (t_exit == 0) {
      failures++;
      t_exit = rpb_now_ns();
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) nonzero++;
    hs[i] = (t_hs - t0) / 1e3;
    ready[i] = (t_ready - t0) / 1e3;
    rtt[i] = (t_s1 - t_s0) / 1e3;
    exit_after[i] = t_exit > t_s1 ? (t_exit - t_s1) / 1e3 : 0;
    kill_us[i] = (t_exit - t_s0) / 1e3;
  }
  add_json(&p, &left, "{");
  dist_line(&p, &left, "exec_to_handshake", hs, (size_t)n);
  dist_line(&p, &left, "exec_to_ready", ready, (size_t)n);
  dist_line(&p, &left, "shutdown_rtt", rtt, (size_t)n);
  dist_line(&p, &left, "reply_to_exit", exit_after, (size_t)n);
  dist_line(&p, &left, "shutdown_to_exit", kill_us, (size_t)n);
  add_json(&p, &left,
           "\"n\": %ld, \"failures\": %ld, \"nonzero_exit\": %ld, "
           "\"shutdown_not_ok\": %ld, \"shutdown_last_status\": %d}",
           n, failures, nonzero, not_ok, last_code);
  rpb_say("RESULT %s", out);
  free(hs);
  free(ready);
  free(rtt);
  free(exit_after);
  free(kill_us);
  return failures ? 1 : 0;
}

/* exec -> exit of CMD, N times (posix_spawn, pidfd). */
static int cmd_exectime(long n, char **argv) {
  static char out[1024];
  char *p = out;
  size_t left = sizeof out;
  double *v = calloc((size_t)n, sizeof(double));
  long i;
  for (i = 0; i < n; i++) {
    child c;
    int status = 0;
    uint64_t t0 = rpb_now_ns(), t1;
    if (spawn(&c, argv) != 0) die("cannot spawn");
    t1 = reap(&c, 10000, &status);
    if (t1 == 0) die("did not exit");
    v[i] = (t1 - t0) / 1e3;
  }
  add_json(&p, &left, "{");
  print_dist(&p, &left, "exec_to_exit", v, (size_t)n);
  add_json(&p, &left, "\"n\": %ld}", n);
  rpb_say("RESULT %s", out);
  free(v);
  return 0;
}

static int cmd_w2(long lines, long line_bytes, char **argv) {
  char line[1024], target[1100];
  unsigned long long expected =
      (unsigned long long)lines * (unsigned long long)line_bytes;
  unsigned long long bytes = 0, msgs = 0, other = 0;
  grpc_slice empty = grpc_empty_slice();
  grpc_channel *ch;
  child c;
  stream s;
  uint64_t t0, t_hs, t_open, t_all, t_exit;
  int status = 0, code;
  t0 = rpb_now_ns();
  ch = launch(&c, argv, line, sizeof line, target, sizeof target);
  t_hs = rpb_now_ns();
  stream_open(&s, ch, "/plugin.GRPCStdio/StreamStdio",
              grpc_raw_byte_buffer_create(&empty, 0), 1);
  wait_op(&s.md);
  t_open = rpb_now_ns();
  while (bytes < expected) {
    long k;
    int chn = 0;
    stream_recv(&s);
    wait_op(&s.recv);
    if (!s.recv.ok || s.in == NULL) break;
    k = rpb_stdio_data_len(s.in, &chn);
    if (k > 0 && chn == 1)
      bytes += (unsigned long long)k;
    else if (k > 0)
      other += (unsigned long long)k;
    msgs++;
    grpc_byte_buffer_destroy(s.in);
    s.in = NULL;
  }
  t_all = rpb_now_ns();
  code = unary_empty(ch, "/plugin.GRPCController/Shutdown");
  grpc_call_cancel(s.call, NULL);
  wait_op(&s.status);
  wait_op(&s.rmd);
  if (s.in) grpc_byte_buffer_destroy(s.in);
  grpc_metadata_array_destroy(&s.imd);
  grpc_metadata_array_destroy(&s.tmd);
  grpc_slice_unref(s.details);
  grpc_call_unref(s.call);
  t_exit = reap(&c, 10000, &status);
  grpc_channel_destroy(ch);
  rpb_say(
      "RESULT {\"lines\": %ld, \"line_bytes\": %ld, \"bytes\": %llu, "
      "\"other_channel_bytes\": %llu, \"messages\": %llu, "
      "\"complete\": %s, \"exec_to_all_s\": %.6f, "
      "\"handshake_to_all_s\": %.6f, \"open_to_all_s\": %.6f, "
      "\"lines_per_s\": %.1f, \"shutdown_status\": %d, "
      "\"exited\": %s}",
      lines, line_bytes, bytes, other, msgs,
      bytes >= expected ? "true" : "false", (t_all - t0) / 1e9,
      (t_all - t_hs) / 1e9, (t_all - t_open) / 1e9,
      lines / ((t_all - t0) / 1e9), code, t_exit ? "true" : "false");
  return bytes >= expected ? 0 : 1;
}

/* ---------------------------------------------------------------- main */

static void usage(void) {
  fprintf(stderr,
          "usage: rpb_client stdio TARGET EXPECTED_BYTES\n"
          "       rpb_client stall TARGET\n"
          "       rpb_client broker TARGET [--echo] [--server-pid P] "
          "[--live PATH] [--anchor ADDR --anchor-pid P]\n"
          "                  [--rtt N] [--open N] "
          "[--pipeline N] [--streams N] [--subchannels N]\n"
          "       rpb_client lifecycle N -- CMD [ARG...]\n"
          "       rpb_client w2 N_LINES LINE_BYTES -- CMD [ARG...]\n"
          "       rpb_client exectime N -- CMD [ARG...]\n");
}

static int dashdash(int argc, char **argv, int from) {
  int i;
  for (i = from; i < argc; i++)
    if (strcmp(argv[i], "--") == 0) return i + 1 < argc ? i + 1 : -1;
  return -1;
}

int main(int argc, char **argv) {
  int rc = 2, i;
  const char *env = getenv("RPB_TIMEOUT_MS");
  if (env) timeout_ms = atol(env);
  if (argc < 3) {
    usage();
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  rpb_raise_nofile();
  grpc_init();
  cq = grpc_completion_queue_create_for_next(NULL);
  if (strcmp(argv[1], "stdio") == 0 && argc == 4) {
    rc = cmd_stdio(argv[2], strtoull(argv[3], NULL, 10), 0);
  } else if (strcmp(argv[1], "stall") == 0) {
    rc = cmd_stdio(argv[2], 0, 1);
  } else if (strcmp(argv[1], "broker") == 0) {
    bopts o;
    memset(&o, 0, sizeof o);
    for (i = 3; i < argc; i++) {
      const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "0";
      if (strcmp(a, "--echo") == 0) {
        o.echo = 1;
        continue;
      }
      if (strcmp(a, "--server-pid") == 0)
        o.server_pid = atoi(v);
      else if (strcmp(a, "--live") == 0)
        o.live = v;
      else if (strcmp(a, "--anchor") == 0)
        o.anchor = v;
      else if (strcmp(a, "--anchor-pid") == 0)
        o.anchor_pid = atoi(v);
      else if (strcmp(a, "--rtt") == 0)
        o.rtt = atol(v);
      else if (strcmp(a, "--open") == 0)
        o.open = atol(v);
      else if (strcmp(a, "--pipeline") == 0)
        o.pipeline = atol(v);
      else if (strcmp(a, "--streams") == 0)
        o.streams = atol(v);
      else if (strcmp(a, "--subchannels") == 0)
        o.subchannels = atol(v);
      else {
        usage();
        return 2;
      }
      i++;
    }
    rc = cmd_broker(argv[2], &o);
  } else if (strcmp(argv[1], "lifecycle") == 0) {
    int k = dashdash(argc, argv, 3);
    if (k < 0) {
      usage();
      return 2;
    }
    rc = cmd_lifecycle(atol(argv[2]), argv + k);
  } else if (strcmp(argv[1], "exectime") == 0) {
    int k = dashdash(argc, argv, 3);
    if (k < 0) {
      usage();
      return 2;
    }
    rc = cmd_exectime(atol(argv[2]), argv + k);
  } else if (strcmp(argv[1], "w2") == 0 && argc > 5) {
    int k = dashdash(argc, argv, 4);
    if (k < 0) {
      usage();
      return 2;
    }
    rc = cmd_w2(atol(argv[2]), atol(argv[3]), argv + k);
  } else {
    usage();
  }
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, rpb_deadline_ms(5000), NULL).type ==
         GRPC_OP_COMPLETE) {
  }
  grpc_completion_queue_destroy(cq);
  grpc_shutdown_blocking();
  return rc;
}
