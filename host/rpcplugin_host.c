/*
 * rpcplugin_host.c - rpcplugin-host, the reference host (README, docs/rpcplugin-host.1):
 * makes a process a go-plugin plugin by serving a manifest's module.
 *
 *   rpcplugin-host [OPTIONS] MANIFEST [-- COMMAND [ARG...]]
 *
 * Startup, in the order a go-plugin client sees it:
 *   1. the magic cookie (go-plugin's message and exit 1 when it is wrong),
 *      then the app protocol version: the highest --app-version the client
 *      lists in PLUGIN_PROTOCOL_VERSIONS, else the lowest one (go-plugin's
 *      fallback: the client then reports the mismatch itself);
 *   2. the manifest, the AutoMTLS certificate when PLUGIN_CLIENT_CERT is set,
 *      the gRPC server with explicit transport limits (largest message and
 *      metadata, streams per connection, idle connections closed), the
 *      listening socket (unix socket in a fresh 0700 directory, or tcp on
 *      127.0.0.1 within PLUGIN_MIN_PORT..PLUGIN_MAX_PORT; without AutoMTLS
 *      the host's own, whose connections it counts and bounds: see
 *      "connections" below), the runtime and the module;
 *   3. the handshake line "1|APP|NETWORK|ADDRESS|grpc[|CERT]", written to
 *      stdout with one write(2) as soon as the socket listens and the module
 *      is loaded; then the server, the runtime and the pipe reader start (a
 *      client that connected meanwhile waits in the listen backlog);
 *   4. fds 1 and 2 become pipes read by host_pipes.c and fed to put_line;
 *      only then COMMAND starts, in its own process group, with stdin from
 *      /dev/null and stdout/stderr on those pipes.  Neither the child nor
 *      anything it starts ever holds the host's original stdout or stderr:
 *      a go-plugin client waits for EOF on the plugin's stderr, so a
 *      lingering grandchild holding it would stall the client's Kill().
 *
 * Then the main thread waits (signalfd + an eventfd the module's shutdown
 * callback writes) for Shutdown, SIGTERM, SIGINT or the child's exit (SIGHUP swaps),
 * looking every 5 s whether memory that a flood freed can go back to the
 * kernel (give_memory_back), and runs one graceful path for all of them:
 *   terminate the child's process group (SIGTERM, SIGKILL after
 *   --kill-grace), stop holding the pipes, let the reader hand over what the
 *   pipes hold (bounded), stop accepting connections,
 *   rpcplugin_runtime_shutdown (stop serving, flush stdio streams and
 *   finish them with OK, stop the module; a put_line still blocked returns
 *   RPCPLUGIN_ESHUTDOWN), join the reader,
 *   rpcplugin_runtime_destroy (dlclose), destroy the server, remove the
 *   socket and its directory, exit 0.
 *
 * The host is a child subreaper, so orphaned descendants are reparented to
 * it and reaped; the direct child also gets PR_SET_PDEATHSIG(SIGTERM) for
 * the case the host itself is killed with SIGKILL.
 *
 * Host diagnostics ("rpcplugin-host: ...", the module's and gRPC's logs) go
 * to the original stderr until the handshake, then into the stderr pipe
 * through a non-blocking descriptor of their own (a full pipe drops a
 * message rather than stall a gRPC thread), and to the original stderr again
 * once the pipes are closed at shutdown.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/close_range.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>
#include <cjson/cJSON.h>
#include <grpc/support/log.h>
#include <rpcplugin/host.h>

#include "host_tool.h"
#include "monotime.h"

#define PROG "rpcplugin-host"
#define MAX_VERSIONS 32
#define MAX_MODULE_PATHS 16
/* The whole graceful path must fit in go-plugin's 2 s grace period. */
#define DEFAULT_KILL_GRACE_MS 500
#define KILL_WAIT_MS 300 /* after SIGKILL */
#define DRAIN_MS 200     /* reading what the pipes hold at shutdown */
#define DRAIN_WAIT_MS 300
/* Transport limits (--help, docs/rpcplugin-host.1 "Limits"). */
#define DEFAULT_MAX_RECV_BYTES (4L << 20) /* gRPC's own default, made explicit */
#define DEFAULT_MAX_STREAMS 2048          /* per connection; see parse_args */
#define DEFAULT_MAX_METADATA 8192         /* gRPC's own default, made explicit */
#define DEFAULT_MAX_CONNECTIONS 64
#define MAX_CONNECTIONS 65536 /* the largest --max-connections */
#define DEFAULT_IDLE_MS 60000
/* Memory back after a flood: see give_memory_back. */
#define TRIM_CHECK_MS 5000
#define MAX_ACCEPTS 64 /* --broker-accept */
#define TRIM_FREED_BYTES ((size_t)2 << 20)

#ifndef RPCPLUGIN_VERSION
#define RPCPLUGIN_VERSION "unknown"
#endif

enum { NET_UNIX, NET_TCP };
enum { R_NONE, R_SHUTDOWN, R_SIGNAL, R_CHILD, R_SWAP };

static struct {
  /* options */
  const char *cookie_key, *cookie_value;
  int versions[MAX_VERSIONS];
  size_t nversions;
  int network;
  int exit_with_child;
  long kill_grace_ms;
  const char *module_paths[MAX_MODULE_PATHS + 3];
  size_t nmodule_paths;
  int exit_on_sigint;
  int full_teardown;
  long poll_threads;
  long max_recv_bytes;  /* --max-receive-bytes */
  long max_streams;     /* --max-concurrent-streams */
  long max_metadata;    /* --max-metadata-bytes */
  long max_connections; /* --max-connections; 0: no bound */
  int max_connections_set;
  long idle_ms;         /* --max-connection-idle; 0: never */
  long mux_keepalive_ms; /* --mux-keepalive; 0: 30 s, -1: none */
  rpcplugin_conn_info accepts[MAX_ACCEPTS]; /* --broker-accept */
  size_t naccepts;
  int no_reflection; /* --no-reflection */
  int log_level;
  gid_t sock_gid; /* PLUGIN_UNIX_SOCKET_GROUP */
  int has_sock_gid;
  const char *manifest_path;
  const char *swap_to; /* --swap-to MANIFEST2, or NULL */
  char **command;

  /* state */
  _Atomic int diag_fd;    /* where host messages go now; -1: nowhere */
  int orig_out, orig_err; /* private close-on-exec copies, or -1 */
  int diag_nb;            /* non-blocking stderr-pipe descriptor, or -1 */
  int fallback;           /* manifest without stdio: pipes go to orig fds */
  int sig_fd, wake_fd;
  rpcplugin_module *mod;
  rpcplugin_module *swap_mod; /* what SIGHUP swaps: the application's
                                 module, else the infrastructure's */
  rpcplugin_load_options *load_opts;
  unsigned long swap_count;
  char infra_path[PATH_MAX]; /* the infrastructure manifest serving */
  host_pipes *pipes;
  pid_t child; /* 0: none */
  int child_reaped;
  int child_status;
  char sock_dir[PATH_MAX];
  char sock_path[PATH_MAX];
  /* go-plugin's gRPC broker multiplexing (PLUGIN_MULTIPLEX_GRPC) */
  int mux;                /* served: one connection, yamux */
  const char *mux_field;  /* the handshake's 7th field, or NULL */
  char mux_dir[PATH_MAX]; /* private: the server's socket, dial sockets */
  char mux_main[PATH_MAX + 16];
  rpcplugin_runtime *rt;
  _Atomic int mux_ended;  /* the client's connection is gone */
  char exe_lib[2][PATH_MAX];
} H;

/* ----------------------------------------------------------- messages */

static void say_fd(int fd, const char *prefix, const char *fmt, va_list ap) {
  char buf[2048];
  int n = snprintf(buf, sizeof buf, "%s", prefix), m;
  m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
  if (m < 0) return;
  n += m;
  if ((size_t)n > sizeof buf - 2) n = (int)sizeof buf - 2;
  buf[n++] = '\n';
  if (fd >= 0) (void)!write(fd, buf, (size_t)n);
}

/* Held (shared) around each message's write, and exclusively while the
 * descriptor behind diag_fd changes: a poller logging during shutdown
 * must not write to a descriptor that was just closed, or to whatever
 * reuses its number (TSan caught that race). */
static pthread_rwlock_t diag_lock = PTHREAD_RWLOCK_INITIALIZER;

/* A host message, one write(2), never blocking after the handshake. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pthread_rwlock_rdlock(&diag_lock);
  say_fd(atomic_load(&H.diag_fd), PROG ": ", fmt, ap);
  pthread_rwlock_unlock(&diag_lock);
  va_end(ap);
}

/* Messages before the handshake may also be plain stderr. */
static void early(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void early(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  say_fd(2, PROG ": ", fmt, ap);
  va_end(ap);
}

static void on_log(void *ud, int level, const char *msg) {
  static const char *const names[] = {"error", "warning", "info", "debug"};
  (void)ud;
  if (level > H.log_level) return;
  say("%s: %s", names[level < 0 ? 0 : level > 3 ? 3 : level], msg);
}

static void on_gpr_log(gpr_log_func_args *a) {
  say("grpc %s %s:%d: %s", gpr_log_severity_string(a->severity), a->file,
      a->line, a->message);
}

/* ------------------------------------------------------------- usage */

static void usage(FILE *f) {
  /* clang-format off */
  fprintf(f,
"Usage: " PROG " [OPTIONS] MANIFEST [-- COMMAND [ARG...]]\n"
"\n"
"Serve the go-plugin infrastructure services of MANIFEST's module (GRPCBroker,\n"
"GRPCStdio, GRPCController, health), and with an application's MANIFEST its\n"
"services next to those of the manifest its \"infrastructure\" names, as a\n"
"go-plugin plugin: check the magic cookie, negotiate the protocol version,\n"
"listen, print the handshake line on stdout, then forward this process's\n"
"stdout/stderr, and COMMAND's, to the client through GRPCStdio.  Exits 0 after\n"
"Shutdown, SIGTERM or (by default) the end of COMMAND.  SIGINT is ignored, as\n"
"go-plugin's own plugins do: Ctrl-C reaches the whole process group and the\n"
"client stops its plugins itself.  SIGHUP swaps the implementation live (the\n"
"application's module with an application MANIFEST, else the infrastructure\n"
"module): to MANIFEST2 and back with --swap-to, else to MANIFEST as it is on\n"
"disk now (a rebuilt module is picked up); clients see no interruption, and\n"
"each swap is logged on stderr with its outcome and duration.\n"
"\n"
"Options (before MANIFEST):\n"
"  --magic-cookie KEY=VALUE  refuse to run (exit 1) unless the environment\n"
"                            has KEY=VALUE, with go-plugin's message; KEY\n"
"                            alone: any non-empty value (for applications\n"
"                            that make a fresh value per launch, as CrowdSec)\n"
"  --app-version N[,N...]    app protocol version(s) served (default 1)\n"
"  --network unix|tcp        unix socket in a private directory (default), or\n"
"                            tcp on 127.0.0.1\n"
"  --exit-with-child         exit when COMMAND exits (default)\n"
"  --no-exit-with-child      keep serving after COMMAND exits\n"
"  --kill-grace MS           SIGTERM-to-SIGKILL time for COMMAND's process\n"
"                            group at exit (default %d)\n"
"  --module-path DIR         look for the manifest's module in DIR too\n"
"  --exit-on-sigint          make SIGINT a graceful exit too (default: ignore\n"
"                            it, as go-plugin's own plugins do)\n"
"  --ignore-sigint           ignore SIGINT (the default; kept for scripts)\n"
"  --no-reflection           do not serve gRPC server reflection\n"
"                            (grpc.reflection.v1alpha, served by default)\n"
"  --swap-to MANIFEST2       SIGHUP alternates between MANIFEST and MANIFEST2\n"
"                            (same services; default: SIGHUP reloads MANIFEST)\n"
"  --poll-threads N          threads that run the handlers (default 4 with an\n"
"                            application manifest, else 1)\n"
"  --max-receive-bytes N     largest message a client may send (default %ld,\n"
"                            gRPC's own); a larger one ends its call with\n"
"                            RESOURCE_EXHAUSTED\n"
"  --max-concurrent-streams N\n"
"                            calls open at once on one connection (HTTP/2\n"
"                            SETTINGS_MAX_CONCURRENT_STREAMS, default %ld);\n"
"                            the client holds further ones back until one ends\n"
"  --max-metadata-bytes N    largest metadata (headers) a call may carry\n"
"                            (default %ld, gRPC's own)\n"
"  --max-connections N       connections open at once (default %ld, 0: no\n"
"                            bound); one more is closed at once with an HTTP/2\n"
"                            GOAWAY; not applied with AutoMTLS (see the manual)\n"
"  --max-connection-idle MS  close a connection that has had no call for MS\n"
"                            (default %ld; 0: never)\n"
"  --broker-accept ID:NETWORK:ADDRESS\n"
"                            with multiplexing, a service reachable through\n"
"                            the broker under ID (go-plugin's Accept): a\n"
"                            client's knock for ID sends its next stream to\n"
"                            NETWORK (unix or tcp) ADDRESS; repeatable\n"
"  --mux-keepalive MS        with multiplexing, the yamux ping interval\n"
"                            (default 30000, yamux's; 0: no pings); a ping\n"
"                            unanswered by the next one ends the connection\n"
"  --full-teardown           before exiting, also unload the module, destroy\n"
"                            the server and shut gRPC down (for leak checkers;\n"
"                            by default the host exits once everything was\n"
"                            flushed, stopped and removed)\n"
"  -v, --verbose             more host and module messages (twice: debug)\n"
"  -h, --help                this help\n"
"  -V, --version             version information\n"
"\n"
"COMMAND runs in its own process group, stdin from /dev/null.  Output waits in\n"
"the module's bounded queue until a client calls StreamStdio; the manifest's\n"
"config.stdio.overflow decides what a full queue does (manifests/host.json:\n"
"drop the oldest, so clients that never read, like go-plugin < 1.3, never\n"
"block COMMAND; \"block\": COMMAND waits, as on a pipe).  When COMMAND exits,\n"
"the host goes on serving until a StreamStdio client has read what is queued,\n"
"or config.stdio.flush_deadline_ms has passed since the exit.\n"
"\n"
"Environment (go-plugin's): PLUGIN_PROTOCOL_VERSIONS, PLUGIN_MIN_PORT,\n"
"PLUGIN_MAX_PORT, PLUGIN_UNIX_SOCKET_DIR, PLUGIN_UNIX_SOCKET_GROUP (group name\n"
"or gid owning the socket and its folder: the socket is read/write and the\n"
"folder searchable for that group only), PLUGIN_CLIENT_CERT (AutoMTLS),\n"
"PLUGIN_MULTIPLEX_GRPC (true: go-plugin's gRPC broker multiplexing, one\n"
"connection with yamux streams, and the handshake line gets a 7th field\n"
"\"true\"; false: \"false\"); RPCPLUGIN_MODULE_PATH (module search\n"
"path), RPCPLUGIN_MANIFEST_PATH (where an application manifest's\n"
"infrastructure manifest is looked for), TMPDIR.\n",
          DEFAULT_KILL_GRACE_MS, DEFAULT_MAX_RECV_BYTES,
          (long)DEFAULT_MAX_STREAMS, (long)DEFAULT_MAX_METADATA,
          (long)DEFAULT_MAX_CONNECTIONS, (long)DEFAULT_IDLE_MS);
  /* clang-format on */
}

static int parse_long(const char *s, long lo, long hi, long *out) {
  char *end;
  long v;
  errno = 0;
  v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi) return -1;
  *out = v;
  return 0;
}

static int add_versions(const char *s) {
  char *copy = strdup(s), *save = NULL, *tok;
  int rc = 0;
  if (copy == NULL) return -1;
  for (tok = strtok_r(copy, ",", &save); tok;
       tok = strtok_r(NULL, ",", &save)) {
    long v;
    if (parse_long(tok, 0, INT_MAX, &v) || H.nversions == MAX_VERSIONS) {
      rc = -1;
      break;
    }
    H.versions[H.nversions++] = (int)v;
  }
  if (tok == NULL && H.nversions == 0) rc = -1;
  free(copy);
  return rc;
}

/* Returns -1 to go on, else an exit code. */
static int parse_args(int argc, char **argv) {
  enum {
    O_COOKIE = 256,
    O_APPVER,
    O_NET,
    O_EXIT,
    O_NOEXIT,
    O_GRACE,
    O_MODPATH,
    O_NOSIGINT,
    O_SIGINT,
    O_TEARDOWN,
    O_NOREFL,
    O_POLLERS,
    O_SWAPTO,
    O_MAXRECV,
    O_MAXSTREAMS,
    O_MAXMETA,
    O_MAXCONN,
    O_IDLE,
    O_MUXPING,
    O_ACCEPT
  };
  static const struct option longopts[] = {
      {"magic-cookie", required_argument, NULL, O_COOKIE},
      {"app-version", required_argument, NULL, O_APPVER},
      {"network", required_argument, NULL, O_NET},
      {"exit-with-child", no_argument, NULL, O_EXIT},
      {"no-exit-with-child", no_argument, NULL, O_NOEXIT},
      {"kill-grace", required_argument, NULL, O_GRACE},
      {"module-path", required_argument, NULL, O_MODPATH},
      {"ignore-sigint", no_argument, NULL, O_NOSIGINT},
      {"exit-on-sigint", no_argument, NULL, O_SIGINT},
      {"full-teardown", no_argument, NULL, O_TEARDOWN},
      {"no-reflection", no_argument, NULL, O_NOREFL},
      {"poll-threads", required_argument, NULL, O_POLLERS},
      {"swap-to", required_argument, NULL, O_SWAPTO},
      {"max-receive-bytes", required_argument, NULL, O_MAXRECV},
      {"max-concurrent-streams", required_argument, NULL, O_MAXSTREAMS},
      {"max-metadata-bytes", required_argument, NULL, O_MAXMETA},
      {"max-connections", required_argument, NULL, O_MAXCONN},
      {"max-connection-idle", required_argument, NULL, O_IDLE},
      {"mux-keepalive", required_argument, NULL, O_MUXPING},
      {"broker-accept", required_argument, NULL, O_ACCEPT},
      {"verbose", no_argument, NULL, 'v'},
      {"help", no_argument, NULL, 'h'},
      {"version", no_argument, NULL, 'V'},
      {NULL, 0, NULL, 0}};
  int c, rest;
  long v;

  H.network = NET_UNIX;
  H.exit_with_child = 1;
  H.kill_grace_ms = DEFAULT_KILL_GRACE_MS;
  H.poll_threads = 0; /* by the manifest: see main */
  /* The transport's limits.  The message and metadata bounds are gRPC's
   * own defaults, set explicitly.  Streams per connection: gRPC's default
   * has no bound; 2048 leaves room for everything the module allows on
   * one connection (config.broker.max_streams 1024 StartStream streams
   * and config.stdio.max_streams 16 StreamStdio streams at their
   * defaults) plus as many unary calls, so with the default manifest a
   * client meets the module's limits (RESOURCE_EXHAUSTED at once) before
   * the transport's (calls held back).  Connections: go-plugin's client
   * opens one, a tool such as grpcurl one more; an idle one costs about
   * 17 KiB and a descriptor (measured, tests/integration/test_limits.py),
   * so 64 hold about 1 MiB and stay far below the usual RLIMIT_NOFILE of
   * 1024.  Idle: a go-plugin client keeps its StartStream stream open, so
   * its connection is never idle; one that anything else left open without
   * calls gives its descriptor and memory back after a minute (a gRPC
   * client reconnects at its next call). */
  H.max_recv_bytes = DEFAULT_MAX_RECV_BYTES;
  H.max_streams = DEFAULT_MAX_STREAMS;
  H.max_metadata = DEFAULT_MAX_METADATA;
  H.max_connections = DEFAULT_MAX_CONNECTIONS;
  H.idle_ms = DEFAULT_IDLE_MS;
  H.log_level = RPCPLUGIN_LOG_WARN;
  opterr = 0;
  /* "+": options end at MANIFEST, so COMMAND's own options stay its own. */
  while ((c = getopt_long(argc, argv, "+vhV", longopts, NULL)) != -1) {
    switch (c) {
      case O_COOKIE: {
        char *eq = strchr(optarg, '=');
        if (eq == optarg || *optarg == '\0') {
          early("--magic-cookie: expected KEY=VALUE or KEY, got \"%s\"",
                optarg);
          return 2;
        }
        /* KEY alone: the host application makes a fresh value for each
         * launch (CrowdSec does), so any non-empty value is accepted. */
        if (eq) *eq = '\0';
        H.cookie_key = optarg;
        H.cookie_value = eq ? eq + 1 : NULL;
        break;
      }
      case O_APPVER:
        if (add_versions(optarg)) {
          early(
              "--app-version: expected N[,N...] (at most %d versions, "
              "each 0..%d), got \"%s\"",
              MAX_VERSIONS, INT_MAX, optarg);
          return 2;
        }
        break;
      case O_NET:
        if (strcmp(optarg, "unix") == 0)
          H.network = NET_UNIX;
        else if (strcmp(optarg, "tcp") == 0)
          H.network = NET_TCP;
        else {
          early("--network: expected unix or tcp, got \"%s\"", optarg);
          return 2;
        }
        break;
      case O_EXIT:
        H.exit_with_child = 1;
        break;
      case O_NOEXIT:
        H.exit_with_child = 0;
        break;
      case O_GRACE:
        if (parse_long(optarg, 0, 60000, &v)) {
          early("--kill-grace: expected milliseconds 0..60000, got \"%s\"",
                optarg);
          return 2;
        }
        H.kill_grace_ms = v;
        break;
      case O_MODPATH:
        if (H.nmodule_paths == MAX_MODULE_PATHS) {
          early("--module-path: at most %d folders", MAX_MODULE_PATHS);
          return 2;
        }
        H.module_paths[H.nmodule_paths++] = optarg;
        break;
      case O_NOSIGINT:
        H.exit_on_sigint = 0;
        break;
      case O_SIGINT:
        H.exit_on_sigint = 1;
        break;
      case O_TEARDOWN:
        H.full_teardown = 1;
        break;
      case O_NOREFL:
        H.no_reflection = 1;
        break;
      case O_POLLERS:
        if (parse_long(optarg, 1, 64, &v)) {
          early("--poll-threads: expected 1..64, got \"%s\"", optarg);
          return 2;
        }
        H.poll_threads = v;
        break;
      case O_SWAPTO:
        H.swap_to = optarg;
        break;
      case O_MAXRECV:
        if (parse_long(optarg, 1024, INT_MAX, &v)) {
          early("--max-receive-bytes: expected bytes 1024..%d, got \"%s\"",
                INT_MAX, optarg);
          return 2;
        }
        H.max_recv_bytes = v;
        break;
      case O_MAXSTREAMS:
        if (parse_long(optarg, 1, INT_MAX, &v)) {
          early("--max-concurrent-streams: expected 1..%d, got \"%s\"",
                INT_MAX, optarg);
          return 2;
        }
        H.max_streams = v;
        break;
      case O_MAXMETA:
        if (parse_long(optarg, 1024, 16L << 20, &v)) {
          early("--max-metadata-bytes: expected bytes 1024..%ld, got \"%s\"",
                16L << 20, optarg);
          return 2;
        }
        H.max_metadata = v;
        break;
      case O_MAXCONN:
        if (parse_long(optarg, 0, MAX_CONNECTIONS, &v)) {
          early("--max-connections: expected 0..%d (0: no bound), got \"%s\"",
                MAX_CONNECTIONS, optarg);
          return 2;
        }
        H.max_connections = v;
        H.max_connections_set = 1;
        break;
      case O_IDLE:
        if (parse_long(optarg, 0, INT_MAX, &v)) {
          early(
              "--max-connection-idle: expected milliseconds 0..%d (0: never), "
              "got \"%s\"",
              INT_MAX, optarg);
          return 2;
        }
        H.idle_ms = v;
        break;
      case O_MUXPING:
        if (parse_long(optarg, 0, 3600000, &v)) {
          early("--mux-keepalive: expected milliseconds 0..3600000 (0: no "
                "pings), got \"%s\"", optarg);
          return 2;
        }
        H.mux_keepalive_ms = v == 0 ? -1 : v;
        break;
      case O_ACCEPT: {
        /* ID:NETWORK:ADDRESS */
        char *e1, *e2;
        long id = strtol(optarg, &e1, 10);
        if (H.naccepts >= MAX_ACCEPTS || e1 == optarg || *e1 != ':' ||
            id < 1 || id > 0xffffffffL || (e2 = strchr(e1 + 1, ':')) == NULL ||
            !((e2 - e1 - 1 == 4 && strncmp(e1 + 1, "unix", 4) == 0) ||
              (e2 - e1 - 1 == 3 && strncmp(e1 + 1, "tcp", 3) == 0)) ||
            e2[1] == '\0' || strlen(e2 + 1) > 255) {
          early("--broker-accept: expected ID:unix:PATH or ID:tcp:HOST:PORT "
                "(at most %d), got \"%s\"", MAX_ACCEPTS, optarg);
          return 2;
        }
        H.accepts[H.naccepts].service_id = (uint32_t)id;
        snprintf(H.accepts[H.naccepts].network,
                 sizeof H.accepts[H.naccepts].network, "%.*s",
                 (int)(e2 - e1 - 1), e1 + 1);
        snprintf(H.accepts[H.naccepts].address,
                 sizeof H.accepts[H.naccepts].address, "%s", e2 + 1);
        H.naccepts++;
        break;
      }
      case 'v':
        if (H.log_level < RPCPLUGIN_LOG_DEBUG) H.log_level++;
        break;
      case 'h':
        usage(stdout);
        return 0;
      case 'V':
        printf(PROG " %s (rpcplugin ABI %d.%d, gRPC core %s)\n",
               RPCPLUGIN_VERSION, RPCPLUGIN_ABI_MAJOR, RPCPLUGIN_ABI_MINOR,
               grpc_version_string());
        return 0;
      default:
        if (optopt)
          early("unknown option -%c (try --help)", optopt);
        else
          early("unknown or incomplete option \"%s\" (try --help)",
                argv[optind - 1]);
        return 2;
    }
  }
  if (H.nversions == 0) H.versions[H.nversions++] = 1;
  rest = argc - optind;
  if (rest < 1) {
    early("missing MANIFEST (try --help)");
    return 2;
  }
  H.manifest_path = argv[optind];
  if (rest >= 2) {
    if (strcmp(argv[optind + 1], "--") != 0) {
      early(
          "unexpected \"%s\" after MANIFEST: options go before MANIFEST, "
          "and COMMAND after \"--\"",
          argv[optind + 1]);
      return 2;
    }
    if (rest < 3) {
      early("\"--\" must be followed by COMMAND");
      return 2;
    }
    H.command = &argv[optind + 2];
  }
  return -1;
}

/* ------------------------------------------------------ go-plugin env */

static int check_cookie(void) {
  const char *v;
  if (H.cookie_key == NULL) return 0;
  v = getenv(H.cookie_key);
  if (v == NULL ||
      (H.cookie_value ? strcmp(v, H.cookie_value) != 0 : *v == '\0')) {
    /* go-plugin's text, word for word. */
    fprintf(stderr,
            "This binary is a plugin. These are not meant to be executed "
            "directly.\n"
            "Please execute the program that consumes these plugins, which "
            "will\n"
            "load any plugins automatically\n");
    return -1;
  }
  return 0;
}

static int cmp_int_desc(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x < y) - (x > y);
}

/* go-plugin's protocolVersion(): the highest version both sides know, else
 * the lowest of ours. */
static int negotiate_version(void) {
  const char *env = getenv("PLUGIN_PROTOCOL_VERSIONS");
  int client[64];
  size_t nclient = 0, i, j;
  qsort(H.versions, H.nversions, sizeof H.versions[0], cmp_int_desc);
  if (env && *env) {
    char *copy = strdup(env), *save = NULL, *tok;
    for (tok = copy ? strtok_r(copy, ",", &save) : NULL; tok;
         tok = strtok_r(NULL, ",", &save)) {
      long v;
      if (parse_long(tok, INT_MIN, INT_MAX, &v)) {
        early("PLUGIN_PROTOCOL_VERSIONS: ignoring invalid version \"%s\"", tok);
        continue;
      }
      if (nclient < 64) client[nclient++] = (int)v;
    }
    free(copy);
  }
  for (i = 0; i < H.nversions; i++)
    for (j = 0; j < nclient; j++)
      if (client[j] == H.versions[i]) return H.versions[i];
  if (nclient > 0) {
    char ours[256] = "";
    size_t used = 0;
    for (i = 0; i < H.nversions && used + 16 < sizeof ours; i++)
      used += (size_t)snprintf(ours + used, sizeof ours - used, "%s%d",
                               i ? "," : "", H.versions[i]);
    early(
        "warning: no common app protocol version: the client accepts %s, "
        "this plugin serves %s; announcing %d",
        env, ours, H.versions[H.nversions - 1]);
  }
  return H.versions[H.nversions - 1];
}

/* PLUGIN_MIN_PORT / PLUGIN_MAX_PORT as go-plugin reads them. */
static int port_range(long *lo, long *hi) {
  const char *names[2] = {"PLUGIN_MIN_PORT", "PLUGIN_MAX_PORT"};
  long *outs[2] = {lo, hi};
  int i;
  for (i = 0; i < 2; i++) {
    const char *s = getenv(names[i]);
    *outs[i] = 0;
    if (s && *s && parse_long(s, 0, 65535, outs[i])) {
      early("%s: expected a port number 0..65535, got \"%s\"", names[i], s);
      return -1;
    }
  }
  if (*lo > *hi) {
    early("PLUGIN_MIN_PORT (%ld) is greater than PLUGIN_MAX_PORT (%ld)", *lo,
          *hi);
    return -1;
  }
  return 0;
}

/* PLUGIN_UNIX_SOCKET_GROUP, as go-plugin reads it: a numeric gid, else a
 * group name.  0 when unset (or with tcp), -1 after a message. */
static int socket_group(void) {
  const char *g = getenv("PLUGIN_UNIX_SOCKET_GROUP");
  long v;
  if (g == NULL || *g == '\0' || H.network != NET_UNIX) return 0;
  if (parse_long(g, 0, INT_MAX, &v) == 0) {
    H.sock_gid = (gid_t)v;
  } else {
    struct group gr, *res = NULL;
    char buf[16384];
    int e = getgrnam_r(g, &gr, buf, sizeof buf, &res);
    if (res == NULL) {
      early("PLUGIN_UNIX_SOCKET_GROUP: no group named \"%s\"%s%s", g,
            e ? ": " : "", e ? strerror(e) : "");
      return -1;
    }
    H.sock_gid = res->gr_gid;
  }
  H.has_sock_gid = 1;
  return 0;
}

/* Give the socket, then its folder, to PLUGIN_UNIX_SOCKET_GROUP: read and
 * write on the socket, search on the folder, for that group only.  The
 * folder is still 0700 while the socket changes, so nobody else can reach
 * the socket in between. */
static int share_socket_with_group(void) {
  const char *what = H.sock_path;
  if (chown(H.sock_path, (uid_t)-1, H.sock_gid) != 0 ||
      chmod(H.sock_path, 0660) != 0 ||
      (what = H.sock_dir, chown(H.sock_dir, (uid_t)-1, H.sock_gid) != 0) ||
      chmod(H.sock_dir, 0710) != 0) {
    early("PLUGIN_UNIX_SOCKET_GROUP: cannot give %s to group %lu: %s", what,
          (unsigned long)H.sock_gid, strerror(errno));
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------ listen */

/* Would 127.0.0.1:port bind now?  Keeps gRPC from logging an error for
 * every busy port of the range. */
static int port_free(long port) {
  struct sockaddr_in a;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, ok;
  if (fd < 0) return 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
  close(fd);
  return ok;
}

/*
 * Incoming connections.  gRPC 1.51's C core has no bound on how many
 * connections a server holds (GRPC_ARG_MAX_ALLOWED_INCOMING_CONNECTIONS
 * came in a later release), and its listener stops accepting for good at
 * the first accept(2) error other than EAGAIN or EINTR: a flood that takes
 * the process to RLIMIT_NOFILE ("Failed accept4: Too many open files")
 * would leave the plugin unreachable after the flood ended.  So, without
 * AutoMTLS, the host listens on a socket of its own: one thread accepts,
 * counts the connections still open, and hands each one to gRPC with
 * grpc_server_add_channel_from_fd (the server's channel arguments apply to
 * it as to gRPC's own connections).  A connection beyond --max-connections
 * is answered with an HTTP/2 GOAWAY (ENHANCE_YOUR_CALM, "too many
 * connections") and closed; an accept(2) that fails (EMFILE) is tried
 * again 100 ms later.  A connection counts as open while the descriptor
 * gRPC got for it is open (gRPC closes it when the connection ends): the
 * thread records each one's number and inode, and looks again (fstat) when
 * it needs the count.  With AutoMTLS gRPC listens itself (1.51's
 * grpc_server_add_channel_from_fd takes insecure credentials only), and
 * connections are not bounded.
 */
typedef struct conn_rec {
  int fd;
  dev_t dev;
  ino_t ino;
} conn_rec;

static struct {
  int fd; /* our listening socket; -1: gRPC listens (AutoMTLS) */
  int tcp;
  int stop_fd; /* eventfd: stop the acceptor */
  int running; /* the acceptor thread was started */
  pthread_t thread;
  grpc_server *server;
  grpc_server_credentials *creds; /* insecure, for the accepted fds */
  conn_rec *conns;                /* max_connections entries */
  size_t nconns;
  /* counters (written by the acceptor, read by log_stats) */
  _Atomic unsigned long accepted, refused, accept_errors;
  unsigned long refused_reported;
  int64_t last_report_ms;
} L = {.fd = -1, .stop_fd = -1};

/* Bind and listen on a socket of our own; -1 (errno set) on failure. */
static int own_listener(const struct sockaddr *sa, socklen_t len) {
  int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
                  0),
      one = 1, e;
  if (fd < 0) return -1;
  if (sa->sa_family == AF_INET)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, sa, len) == 0 && listen(fd, SOMAXCONN) == 0) return fd;
  e = errno;
  close(fd);
  errno = e;
  return -1;
}

/* Add the listening port; fills addr (the handshake's NETWORK-ADDR).
 * creds NULL: listen ourselves (insecure, connections bounded), else
 * gRPC's listener with creds. */
static int listen_on(grpc_server *server, grpc_server_credentials *creds,
                     char *addr, size_t addrlen) {
  char target[PATH_MAX + 8];
  if (H.network == NET_UNIX) {
    const char *base = getenv("PLUGIN_UNIX_SOCKET_DIR");
    struct sockaddr_un *su = NULL;
    if (base == NULL || *base == '\0') base = getenv("TMPDIR");
    if (base == NULL || *base == '\0') base = "/tmp";
    if ((size_t)snprintf(H.sock_dir, sizeof H.sock_dir, "%s/rpcplugin-XXXXXX",
                         base) >= sizeof H.sock_dir) {
      early("socket directory name too long: %s", base);
      H.sock_dir[0] = '\0';
      return -1;
    }
    /* mkdtemp: a fresh directory, mode 0700. */
    if (mkdtemp(H.sock_dir) == NULL) {
      early("cannot create a socket directory in %s: %s", base,
            strerror(errno));
      H.sock_dir[0] = '\0';
      return -1;
    }
    if ((size_t)snprintf(H.sock_path, sizeof H.sock_path, "%s/plugin.sock",
                         H.sock_dir) >= sizeof su->sun_path) {
      early(
          "socket path %s is longer than a unix socket allows (%zu); set "
          "PLUGIN_UNIX_SOCKET_DIR to a shorter folder",
          H.sock_path, sizeof su->sun_path - 1);
      return -1;
    }
    snprintf(target, sizeof target, "unix:%s", H.sock_path);
    if (creds == NULL) {
      struct sockaddr_un a;
      memset(&a, 0, sizeof a);
      a.sun_family = AF_UNIX;
      memcpy(a.sun_path, H.sock_path, strlen(H.sock_path) + 1);
      L.fd = own_listener((struct sockaddr *)&a, sizeof a);
      if (L.fd < 0) {
        early("cannot listen on %s: %s", H.sock_path, strerror(errno));
        return -1;
      }
    } else if (grpc_server_add_http2_port(server, target, creds) <= 0) {
      early("cannot listen on %s", H.sock_path);
      return -1;
    }
    if (H.has_sock_gid && share_socket_with_group() != 0) return -1;
    snprintf(addr, addrlen, "%s", H.sock_path);
    return 0;
  } else {
    long lo, hi, port;
    if (port_range(&lo, &hi)) return -1;
    for (port = lo; port <= hi; port++) {
      int bound;
      if (creds == NULL) {
        struct sockaddr_in a;
        socklen_t alen = sizeof a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        L.fd = own_listener((struct sockaddr *)&a, sizeof a);
        if (L.fd < 0) continue;
        if (getsockname(L.fd, (struct sockaddr *)&a, &alen) != 0) {
          early("getsockname: %s", strerror(errno));
          return -1;
        }
        L.tcp = 1;
        snprintf(addr, addrlen, "127.0.0.1:%d", (int)ntohs(a.sin_port));
        return 0;
      }
      if (port != 0 && !port_free(port)) continue;
      snprintf(target, sizeof target, "127.0.0.1:%ld", port);
      bound = grpc_server_add_http2_port(server, target, creds);
      if (bound > 0) {
        snprintf(addr, addrlen, "127.0.0.1:%d", bound);
        return 0;
      }
    }
    early("cannot bind a tcp listener on 127.0.0.1 in ports %ld..%ld", lo, hi);
    return -1;
  }
}

static void remove_socket(void) {
  if (H.sock_path[0]) unlink(H.sock_path);
  if (H.sock_dir[0]) rmdir(H.sock_dir);
  H.sock_path[0] = H.sock_dir[0] = '\0';
  if (H.mux_dir[0]) {
    /* Only sockets of ours are in it: the server's and the dial ones. */
    DIR *d = opendir(H.mux_dir);
    struct dirent *e;
    char p[PATH_MAX + 300];
    while (d && (e = readdir(d)) != NULL) {
      if (e->d_name[0] == '.') continue;
      snprintf(p, sizeof p, "%s/%s", H.mux_dir, e->d_name);
      unlink(p);
    }
    if (d) closedir(d);
    rmdir(H.mux_dir);
    H.mux_dir[0] = '\0';
  }
}

/* Multiplexing: the server also listens on a unix socket in a fresh 0700
 * folder, with the credentials its public listener would have had (TLS
 * under AutoMTLS); each yamux stream the client opens becomes a connection
 * to it.  (See host-api/mux.h for why.) */
static int mux_listen(grpc_server *server, grpc_server_credentials *creds) {
  const char *base = getenv("TMPDIR");
  char target[PATH_MAX + 32];
  grpc_server_credentials *insecure = NULL;
  int ok;
  if (base == NULL || *base == '\0') base = "/tmp";
  if ((size_t)snprintf(H.mux_dir, sizeof H.mux_dir, "%s/rpcplugin-mux-XXXXXX",
                       base) >= sizeof H.mux_dir ||
      strlen(H.mux_dir) + 24 >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
    early("multiplexing: folder name too long in %s; set TMPDIR to a "
          "shorter folder", base);
    H.mux_dir[0] = '\0';
    return -1;
  }
  if (mkdtemp(H.mux_dir) == NULL) {
    early("multiplexing: cannot create a folder in %s: %s", base,
          strerror(errno));
    H.mux_dir[0] = '\0';
    return -1;
  }
  snprintf(H.mux_main, sizeof H.mux_main, "%s/main.sock", H.mux_dir);
  snprintf(target, sizeof target, "unix:%s", H.mux_main);
  if (creds == NULL) creds = insecure = grpc_insecure_server_credentials_create();
  ok = creds && grpc_server_add_http2_port(server, target, creds) > 0;
  if (insecure) grpc_server_credentials_release(insecure);
  if (!ok) {
    early("multiplexing: cannot listen on %s", H.mux_main);
    return -1;
  }
  return 0;
}

/* ------------------------------------------------------------- stdio */

static int write_all(int fd, const void *data, size_t len) {
  const char *p = data;
  while (len > 0) {
    ssize_t n = write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static int pipe_sink(void *ctx, int channel, const void *data, size_t len) {
  (void)ctx;
  if (H.fallback) {
    int fd = channel == RPCPLUGIN_STDOUT ? H.orig_out : H.orig_err;
    return write_all(fd, data, len) ? RPCPLUGIN_EIO : 0;
  }
  return rpcplugin_module_put_line(H.mod, channel, data, len);
}

/*
 * The largest chunk the pipe reader hands to put_line: an eighth of the
 * manifest's config.stdio.queue_bytes (the stdio queue bound; the
 * module's default is 8 MiB), between 256 bytes and 1 MiB.  The drop
 * policies can only keep chunks smaller than the whole queue, and a few
 * chunks in the queue at once keep the stream busy.
 */
/* config.stdio.KEY of the manifest (the loader checked its type and range
 * already), or dflt. */
static double stdio_setting(const rpcplugin_manifest *m, const char *key,
                            double dflt) {
  cJSON *root = cJSON_Parse(rpcplugin_manifest_config_json(m));
  const cJSON *stdio = cJSON_GetObjectItemCaseSensitive(root, "stdio");
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(stdio, key);
  double out = dflt;
  if (cJSON_IsNumber(v) && v->valuedouble >= 0) out = v->valuedouble;
  cJSON_Delete(root);
  return out;
}

static size_t stdio_chunk_bytes(const rpcplugin_manifest *m) {
  double queue = stdio_setting(m, "queue_bytes", 8 << 20);
  size_t chunk;
  if (queue <= 0) queue = 8 << 20;
  chunk = (size_t)(queue / 8);
  if (chunk < 256) chunk = 256;
  if (chunk > (1u << 20)) chunk = 1u << 20;
  return chunk;
}

/* After the handshake line: fds 1 and 2 become the pipes. */
static int redirect_stdio(void) {
  int w1 = host_pipes_write_fd(H.pipes, 1),
      w2 = host_pipes_write_fd(H.pipes, 2);
  if (dup2(w1, 1) < 0 || dup2(w2, 2) < 0) return -1;
  host_pipes_close_write(H.pipes);
  /* A descriptor of our own on the stderr pipe, non-blocking without
   * touching the child's (O_NONBLOCK belongs to the open file). */
  H.diag_nb = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  atomic_store(&H.diag_fd, H.diag_nb >= 0 ? H.diag_nb : 2);
  return 0;
}

/* At shutdown: stop holding the pipes' write ends. */
static void release_stdio(void) {
  int nul = open("/dev/null", O_WRONLY | O_CLOEXEC);
  pthread_rwlock_wrlock(&diag_lock);
  atomic_store(&H.diag_fd, H.orig_err);
  if (nul >= 0) {
    dup2(nul, 1);
    dup2(nul, 2);
    close(nul);
  }
  if (H.diag_nb >= 0) {
    close(H.diag_nb);
    H.diag_nb = -1;
  }
  pthread_rwlock_unlock(&diag_lock);
}

/* ------------------------------------------------------------- child */

static void report_child(void) {
  int st = H.child_status;
  if (WIFEXITED(st))
    say("child %d (%s) exited with status %d", (int)H.child, H.command[0],
        WEXITSTATUS(st));
  else if (WIFSIGNALED(st))
    say("child %d (%s) was killed by signal %d (%s)", (int)H.child,
        H.command[0], WTERMSIG(st), strsignal(WTERMSIG(st)));
}

/* Reap every child that ended (orphans come to us: subreaper). */
static void reap(void) {
  for (;;) {
    int st;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid <= 0) break;
    if (pid == H.child && !H.child_reaped) {
      H.child_reaped = 1;
      H.child_status = st;
      report_child();
    }
  }
}

static pid_t spawn_child(void) {
  int errp[2], nul, e = 0;
  ssize_t n;
  pid_t parent = getpid(), pid;
  sigset_t none;

  nul = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (nul < 0 || pipe2(errp, O_CLOEXEC) != 0) {
    say("cannot run %s: %s", H.command[0], strerror(errno));
    if (nul >= 0) close(nul);
    return -1;
  }
  sigemptyset(&none);
  pid = fork();
  if (pid == 0) {
    /* Only async-signal-safe calls from here to exec. */
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    if (dup2(nul, 0) < 0) goto fail;
    /* Whatever the libraries opened without O_CLOEXEC stays ours. */
    (void)close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execvp(H.command[0], H.command);
  fail:
    e = errno;
    (void)!write(errp[1], &e, sizeof e);
    _exit(127);
  }
  e = errno;
  close(nul);
  close(errp[1]);
  if (pid < 0) {
    close(errp[0]);
    say("cannot run %s: fork: %s", H.command[0], strerror(e));
    return -1;
  }
  setpgid(pid, pid); /* also from here: no window without the group */
  H.child = pid;
  do n = read(errp[0], &e, sizeof e);
  while (n < 0 && errno == EINTR);
  close(errp[0]);
  if (n == (ssize_t)sizeof e)
    say("cannot run %s: %s", H.command[0], strerror(e));
  else if (H.log_level >= RPCPLUGIN_LOG_INFO)
    say("started child %d (%s)", (int)pid, H.command[0]);
  return pid;
}

/* Is anything left of the child's process group? */
static int group_alive(void) {
  if (H.child <= 0) return 0;
  reap();
  if (kill(-H.child, 0) == 0) return 1;
  return errno == EPERM;
}

/* Wait for the group to end, reaping, until deadline (monotonic ms). */
static int wait_group(int64_t deadline) {
  while (group_alive()) {
    struct pollfd pfd = {H.sig_fd, POLLIN, 0};
    struct signalfd_siginfo si;
    int64_t left = deadline - rp_mono_ms();
    if (left <= 0) return 0;
    /* SIGCHLD wakes us; the cap catches group members that are not our
     * children. */
    poll(&pfd, 1, left < 20 ? (int)left : 20);
    while (read(H.sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
    }
  }
  return 1;
}

static void terminate_group(void) {
  if (!group_alive()) return;
  kill(-H.child, SIGTERM);
  kill(-H.child, SIGCONT);
  if (wait_group(rp_mono_ms() + H.kill_grace_ms)) return;
  say("child process group %d still running %ld ms after SIGTERM: sending "
      "SIGKILL",
      (int)H.child, H.kill_grace_ms);
  kill(-H.child, SIGKILL);
  if (!wait_group(rp_mono_ms() + KILL_WAIT_MS))
    say("child process group %d did not end after SIGKILL", (int)H.child);
}

/* ------------------------------------------------------- connections */

/* Connections handed to gRPC that are still open (see listen_on's
 * comment); forgets the others. */
static size_t open_connections(void) {
  size_t i = 0;
  while (i < L.nconns) {
    struct stat st;
    conn_rec *c = &L.conns[i];
    if (fstat(c->fd, &st) == 0 && st.st_dev == c->dev && st.st_ino == c->ino)
      i++;
    else
      L.conns[i] = L.conns[--L.nconns];
  }
  return L.nconns;
}

/* Over --max-connections: tell the client why (HTTP/2 server preface, a
 * SETTINGS frame, then GOAWAY with ENHANCE_YOUR_CALM), best effort, and
 * close.  What the client already sent is read first, so that a tcp close
 * sends FIN rather than RST (which could discard the GOAWAY unread). */
static void refuse(int fd) {
  unsigned char buf[128];
  char debug[80];
  int n = snprintf(debug, sizeof debug,
                   "too many connections (rpcplugin-host --max-connections "
                   "%ld)",
                   H.max_connections);
  size_t len = (size_t)n, i;
  static const unsigned char settings[9] = {0, 0, 0, 4, 0, 0, 0, 0, 0};
  memcpy(buf, settings, 9);
  /* GOAWAY: length, type 7, flags 0, stream 0; last stream 0; code 11. */
  buf[9] = 0;
  buf[10] = 0;
  buf[11] = (unsigned char)(8 + len);
  buf[12] = 7;
  memset(buf + 13, 0, 4 + 1 + 4 + 3);
  buf[25] = 11;
  memcpy(buf + 26, debug, len);
  for (i = 0; i < 4; i++)
    if (read(fd, debug, sizeof debug) <= 0) break;
  (void)!send(fd, buf, 26 + len, MSG_NOSIGNAL | MSG_DONTWAIT);
  shutdown(fd, SHUT_WR);
  close(fd);
}

/* Report refusals on the plugin's stderr: the first one, then at most one
 * message every 10 s with the count, so a flood does not flood the
 * client's stdio stream too. */
static void report_refusals(int force) {
  unsigned long r = atomic_load(&L.refused);
  int64_t now = rp_mono_ms();
  if (r == L.refused_reported) return;
  if (!force && L.last_report_ms && now - L.last_report_ms < 10000) return;
  say("refused %lu connection%s over --max-connections %ld (%lu so far)",
      r - L.refused_reported, r - L.refused_reported == 1 ? "" : "s",
      H.max_connections, r);
  L.refused_reported = r;
  L.last_report_ms = now;
}

static void admit(int fd) {
  struct stat st;
  if (H.max_connections > 0) {
    if (open_connections() >= (size_t)H.max_connections) {
      refuse(fd);
      atomic_fetch_add(&L.refused, 1);
      report_refusals(0);
      return;
    }
    /* Recorded before gRPC owns (and may close) the descriptor. */
    if (fstat(fd, &st) == 0) {
      L.conns[L.nconns].fd = fd;
      L.conns[L.nconns].dev = st.st_dev;
      L.conns[L.nconns].ino = st.st_ino;
      L.nconns++;
    }
  }
  if (L.tcp) {
    int one = 1; /* as gRPC's own listener does */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  atomic_fetch_add(&L.accepted, 1);
  grpc_server_add_channel_from_fd(L.server, fd, L.creds);
}

/* Multiplexing: the session ended (the multiplexer's thread). */
static void on_mux_end(void *ud, const char *why) {
  uint64_t one = 1;
  (void)ud;
  atomic_store(&H.mux_ended, 1);
  if (H.log_level >= RPCPLUGIN_LOG_INFO)
    say("multiplexing: the connection ended: %s", why);
  (void)!write(H.wake_fd, &one, sizeof one);
}

static void on_mux_log(void *ud, int level, const char *msg) {
  (void)ud;
  if (level <= H.log_level) say("%s", msg);
}

/* Multiplexing: the routes for --broker-accept, in place before the first
 * byte of the connection is read (a client may knock at once).  Through
 * the broker's host API, as a host's Accept would: with multiplexing
 * librpcplugin turns the advertisement into a route. */
static void on_mux_ready(void *ud) {
  size_t i;
  (void)ud;
  for (i = 0; i < H.naccepts; i++)
    if (rpcplugin_module_broker_advertise(H.mod, H.accepts[i].service_id,
                                          H.accepts[i].network,
                                          H.accepts[i].address) != 0)
      say("multiplexing: --broker-accept %u: cannot add the route",
          (unsigned)H.accepts[i].service_id);
}

/* Multiplexing: the first connection is the client's, for good (go-plugin's
 * GRPCServerMuxer accepts once); the runtime runs yamux on it. */
static void mux_take(int fd) {
  rpcplugin_mux_options o;
  rpcplugin_error err;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.fd = fd;
  o.main_path = H.mux_main;
  o.dial_dir = H.mux_dir;
  o.keepalive_ms = (int)H.mux_keepalive_ms;
  o.on_end = on_mux_end;
  o.log = on_mux_log;
  o.on_ready = on_mux_ready;
  if (L.tcp) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  atomic_fetch_add(&L.accepted, 1);
  if (rpcplugin_runtime_multiplex(H.rt, &o, &err) != 0) {
    /* fd is closed; nobody can reach the plugin any more. */
    say("multiplexing: %s", err.message);
    on_mux_end(NULL, "could not start");
    return;
  }
  if (H.log_level >= RPCPLUGIN_LOG_DEBUG)
    say("multiplexing: serving the client's connection (yamux)");
}

static void *acceptor_main(void *arg) {
  int backoff = 0;
  int64_t last_error_ms = 0;
  (void)arg;
  for (;;) {
    /* After a failed accept, only the stop event for 100 ms: the
     * connection that could not be accepted is still pending. */
    struct pollfd fds[2] = {{L.stop_fd, POLLIN, 0},
                            {L.fd, backoff ? 0 : POLLIN, 0}};
    int fd;
    /* Refusals not reported yet: look again within 10 s. */
    int timeout = backoff ? 100
                  : L.refused_reported != atomic_load(&L.refused) ? 10000
                                                                   : -1;
    if (poll(fds, 2, timeout) < 0) {
      if (errno == EINTR) continue;
      say("connections: poll: %s", strerror(errno));
      break;
    }
    if (fds[0].revents) break;
    report_refusals(0);
    if (backoff) {
      backoff = 0;
      continue;
    }
    if (!(fds[1].revents & POLLIN)) continue;
    fd = accept4(L.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      if (e == EINTR || e == EAGAIN || e == EWOULDBLOCK || e == ECONNABORTED)
        continue;
      /* EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, and accept it then. */
      atomic_fetch_add(&L.accept_errors, 1);
      if (rp_mono_ms() - last_error_ms >= 10000) {
        say("connections: accept: %s (trying again every 100 ms)",
            strerror(e));
        last_error_ms = rp_mono_ms();
      }
      backoff = 1;
      continue;
    }
    if (H.mux) {
      mux_take(fd);
      break; /* one connection only: later ones are refused */
    }
    admit(fd);
  }
  if (H.mux) {
    close(L.fd);
    L.fd = -1;
  }
  report_refusals(1);
  return NULL;
}

/* After grpc_server_start: accept on our own socket.  0 or -errno. */
static int acceptor_start(grpc_server *server) {
  int rc;
  if (L.fd < 0) return 0;
  L.server = server;
  L.creds = grpc_insecure_server_credentials_create();
  L.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (H.max_connections > 0)
    L.conns = calloc((size_t)H.max_connections, sizeof *L.conns);
  if (L.creds == NULL || L.stop_fd < 0 ||
      (H.max_connections > 0 && L.conns == NULL))
    return -ENOMEM;
  if ((rc = pthread_create(&L.thread, NULL, acceptor_main, NULL)) != 0)
    return -rc;
  L.running = 1;
  return 0;
}

/* Stop accepting (before the drain: what connects from now on is refused
 * by the kernel, as after gRPC's own listener shuts down). */
static void acceptor_stop(void) {
  if (L.running) {
    uint64_t one = 1;
    (void)!write(L.stop_fd, &one, sizeof one);
    pthread_join(L.thread, NULL);
    L.running = 0;
  }
  if (L.fd >= 0) {
    close(L.fd);
    L.fd = -1;
  }
}

static void acceptor_free(void) {
  acceptor_stop();
  if (L.stop_fd >= 0) close(L.stop_fd);
  L.stop_fd = -1;
  if (L.creds) grpc_server_credentials_release(L.creds);
  L.creds = NULL;
  free(L.conns);
  L.conns = NULL;
}

/* ---------------------------------------------------------- lifecycle */

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* -vv: how long each startup step took, on the original stderr. */
static void trace_startup(const char *what, int64_t t0) {
  if (H.log_level >= RPCPLUGIN_LOG_DEBUG)
    early("startup: %s %.3f ms after main()", what,
          (double)(now_us() - t0) / 1000.0);
}

/* -vv: how long each step of the graceful path took. */
static void trace_phase(const char *what, int64_t t0) {
  if (H.log_level >= RPCPLUGIN_LOG_DEBUG)
    say("shutdown: %s after %.3f ms", what, (double)(now_us() - t0) / 1000.0);
}

static void on_shutdown(void *ud) {
  uint64_t one = 1;
  (void)ud;
  (void)!write(H.wake_fd, &one, sizeof one); /* poller thread: only note */
}

/* -vv: the module's counters, when the graceful path begins. */
static void log_stats(void) {
  rpcplugin_stats st;
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  if (rpcplugin_module_get_stats(H.mod, &st) != 0) return;
  say("module stats: calls_total=%llu calls_active=%llu "
      "stdio_queued_bytes=%llu stdio_sent_bytes=%llu "
      "stdio_dropped_bytes=%llu broker_streams=%llu broker_messages_in=%llu",
      (unsigned long long)st.calls_total, (unsigned long long)st.calls_active,
      (unsigned long long)st.stdio_queued_bytes,
      (unsigned long long)st.stdio_sent_bytes,
      (unsigned long long)st.stdio_dropped_bytes,
      (unsigned long long)st.broker_streams,
      (unsigned long long)st.broker_messages_in);
  if (H.mux) {
    rpcplugin_mux_stats ms;
    memset(&ms, 0, sizeof ms);
    ms.struct_size = sizeof ms;
    if (rpcplugin_runtime_mux_stats(H.rt, &ms) == 0)
      say("multiplexing: connections=%u streams_accepted=%llu "
          "streams_brokered=%llu streams_refused=%llu streams_opened=%llu "
          "dials=%llu dial_failures=%llu bytes_in=%llu bytes_out=%llu",
          ms.connections, (unsigned long long)ms.streams_accepted,
          (unsigned long long)ms.streams_brokered,
          (unsigned long long)ms.streams_refused,
          (unsigned long long)ms.streams_opened,
          (unsigned long long)ms.dials,
          (unsigned long long)ms.dial_failures,
          (unsigned long long)ms.bytes_in, (unsigned long long)ms.bytes_out);
  }
  if (L.stop_fd >= 0)
    say("connections: accepted=%lu refused=%lu accept_errors=%lu",
        atomic_load(&L.accepted), atomic_load(&L.refused),
        atomic_load(&L.accept_errors));
}

/* One module's part of a swap's log line: its times and, for the
 * infrastructure module, what became of the open streams. */
static void swap_parts(char *buf, size_t len, const rpcplugin_swap_info *si,
                       int streams) {
  snprintf(buf, len, "load %.3f ms, switch %.3f ms, retire %.3f ms%s",
           si->load_ms, si->switch_ms, si->retire_ms,
           !streams            ? ""
           : si->handover == 0 ? ", streams handed over"
                               : ", streams ended: no handover");
}

/* SIGHUP: swap the implementation (rpcplugin_module_swap) to the next
 * manifest, read from disk now.  A failure keeps the old one serving. */
static void swap_now(void) {
  const char *path = H.swap_to && (H.swap_count % 2 == 0) ? H.swap_to
                                                          : H.manifest_path;
  rpcplugin_manifest *m = NULL, *im = NULL;
  rpcplugin_swap_info si, isi;
  rpcplugin_error err;
  int64_t t0 = now_us();
  int infra = 0;
  memset(&si, 0, sizeof si);
  si.struct_size = sizeof si;
  isi = si;
  if (rpcplugin_manifest_load(path, &m, &err) != 0) goto failed;
  if (H.swap_mod != H.mod) {
    /* An application manifest: its infrastructure manifest too, when it
     * names another one than the one serving (or on a reload). */
    if (rpcplugin_manifest_load_infrastructure(m, &im, &err) != 0)
      goto failed;
    if (H.swap_to == NULL ||
        strcmp(rpcplugin_manifest_path(im), H.infra_path) != 0) {
      if (rpcplugin_module_swap(H.mod, im, H.load_opts, &isi, &err) != 0)
        goto failed;
      infra = 1;
      snprintf(H.infra_path, sizeof H.infra_path, "%s",
               rpcplugin_manifest_path(im));
    }
  }
  if (rpcplugin_module_swap(H.swap_mod, m, H.load_opts, &si, &err) != 0)
    goto failed;
  H.swap_count++;
  {
    char app[160], inf[200];
    swap_parts(app, sizeof app, &si, H.swap_mod == H.mod);
    if (infra) {
      swap_parts(inf, sizeof inf, &isi, 1);
      say("swap %lu to %s: ok in %.3f ms (infrastructure %s: %s; "
          "application: %s)",
          H.swap_count, path, (double)(now_us() - t0) / 1e3, H.infra_path,
          inf, app);
    } else {
      say("swap %lu to %s: ok in %.3f ms (%s)", H.swap_count, path,
          si.total_ms, app);
    }
  }
  rpcplugin_manifest_free(im);
  rpcplugin_manifest_free(m);
  return;
failed:
  say("swap to %s failed after %.3f ms: %s; still serving %s%s%s", path,
      (double)(now_us() - t0) / 1e3, err.message,
      rpcplugin_module_path(H.swap_mod), infra ? " with the infrastructure of " : "",
      infra ? H.infra_path : "");
  rpcplugin_manifest_free(im);
  rpcplugin_manifest_free(m);
}

/* Read the signals that are pending; returns R_SIGNAL for one that stops
 * the host (SIGTERM, SIGINT with --exit-on-sigint), else R_NONE.  SIGCHLD
 * reaps, SIGHUP swaps. */
static int read_signals(void) {
  struct signalfd_siginfo si;
  int reason = R_NONE;
  while (read(H.sig_fd, &si, sizeof si) == (ssize_t)sizeof si) {
    switch (si.ssi_signo) {
      case SIGCHLD:
        reap();
        break;
      case SIGHUP:
        swap_now();
        break;
      case SIGINT:
        if (!H.exit_on_sigint) {
          if (H.log_level >= RPCPLUGIN_LOG_INFO) say("ignoring SIGINT");
          break;
        }
        /* fall through */
      default:
        reason = R_SIGNAL;
        break;
    }
  }
  return reason;
}

/*
 * COMMAND exited: what it wrote must not be lost because the client had
 * not opened StreamStdio yet.  Hand everything the pipes hold to the
 * module, then keep serving until the queue is empty (a stream took it
 * all; the shutdown that follows flushes what is in flight) or
 * flush_deadline_ms passed since the exit, whichever comes first, or until
 * Shutdown or a signal says stop.  Returns the reason to stop.
 */
static int serve_until_flushed(int64_t exit_ms, long flush_deadline_ms) {
  int64_t deadline = exit_ms + flush_deadline_ms;
  release_stdio();
  host_pipes_stop(H.pipes, DRAIN_MS);
  if (!host_pipes_wait(H.pipes, DRAIN_WAIT_MS) &&
      H.log_level >= RPCPLUGIN_LOG_INFO)
    say("stdio reader still blocked in put_line after the child exited");
  for (;;) {
    struct pollfd fds[2] = {{H.sig_fd, POLLIN, 0}, {H.wake_fd, POLLIN, 0}};
    rpcplugin_stats st;
    int64_t left;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    if (rpcplugin_module_get_stats(H.mod, &st) != 0 ||
        st.stdio_queue_bytes == 0)
      return R_CHILD;
    left = deadline - rp_mono_ms();
    if (left <= 0) {
      if (H.log_level >= RPCPLUGIN_LOG_INFO)
        say("child exited %ld ms ago and %llu bytes of its output are still "
            "queued (no StreamStdio client took them): shutting down",
            flush_deadline_ms, (unsigned long long)st.stdio_queue_bytes);
      return R_CHILD;
    }
    /* The queue has no event for "empty" that the host can wait on: look
     * again every 2 ms (a client that reads empties it within that). */
    if (poll(fds, 2, left < 2 ? (int)left : 2) < 0 && errno != EINTR)
      return R_CHILD;
    if (fds[1].revents) return R_SHUTDOWN;
    if (fds[0].revents && read_signals() == R_SIGNAL) return R_SIGNAL;
  }
}

/*
 * Memory back after a flood.  What a flood makes gRPC and the module
 * allocate is freed when it ends, but glibc keeps what was freed in its
 * arenas (gRPC buffers in many small slices, which never coalesce into a
 * heap top that free() would trim), so the process stayed as large as the
 * flood made it: a 128 MiB message over --max-receive-bytes (gRPC 1.51
 * takes a message in whole before refusing it) left the host 128 MiB
 * larger for good, 20,000 unread broker knocks 4.4 MiB, 500 connections
 * 9 MiB.  The module trims after a flood of streams only (module/rp_trim.h).
 * So every TRIM_CHECK_MS the main thread looks at how much glibc holds
 * free (mallinfo2: arena bytes in free chunks); once that grew by
 * TRIM_FREED_BYTES since the last trim, malloc_trim(0) hands the free
 * pages back to the kernel.  Memory in use is never touched, and a process
 * whose allocations do not change never trims.
 */
static void give_memory_back(void) {
  static size_t mark = (size_t)-1; /* free bytes after the last trim */
  struct mallinfo2 mi = mallinfo2();
  if (mark == (size_t)-1 || mi.fordblks < mark) {
    mark = mi.fordblks; /* first look, or free memory was reused */
    return;
  }
  if (mi.fordblks - mark < TRIM_FREED_BYTES) return;
  malloc_trim(0);
  if (H.log_level >= RPCPLUGIN_LOG_DEBUG)
    say("memory: %zu KiB more free than after the last trim: trimmed",
        (mi.fordblks - mark) / 1024);
  mark = mallinfo2().fordblks;
}

/* Wait for a reason to stop. */
static int main_loop(void) {
  give_memory_back(); /* the first look: where free memory starts */
  for (;;) {
    struct pollfd fds[2] = {{H.sig_fd, POLLIN, 0}, {H.wake_fd, POLLIN, 0}};
    int reason = R_NONE, n = poll(fds, 2, TRIM_CHECK_MS);
    if (n < 0) {
      if (errno == EINTR) continue;
      say("poll: %s", strerror(errno));
      return R_SIGNAL;
    }
    if (n == 0) {
      give_memory_back();
      continue;
    }
    if (fds[1].revents) reason = R_SHUTDOWN;
    if (fds[0].revents) {
      int r = read_signals();
      if (reason == R_NONE) reason = r;
      if (reason == R_NONE && H.child > 0 && H.child_reaped &&
          H.exit_with_child)
        reason = R_CHILD;
    }
    if (reason != R_NONE) return reason;
  }
}

static void setup_search_path(void) {
  const char *env = getenv("RPCPLUGIN_MODULE_PATH");
  char exe[PATH_MAX];
  ssize_t n;
  /* --module-path first; then, unless RPCPLUGIN_MODULE_PATH says where,
   * beside the executable: <bin>/../lib (build tree) and
   * <bin>/../lib/rpcplugin (a relocated install). */
  if ((env == NULL || *env == '\0') &&
      (n = readlink("/proc/self/exe", exe, sizeof exe - 1)) > 0) {
    char *slash;
    exe[n] = '\0';
    slash = strrchr(exe, '/');
    if (slash) {
      *slash = '\0';
      if ((size_t)snprintf(H.exe_lib[0], sizeof H.exe_lib[0], "%s/../lib",
                           exe) < sizeof H.exe_lib[0])
        H.module_paths[H.nmodule_paths++] = H.exe_lib[0];
      if ((size_t)snprintf(H.exe_lib[1], sizeof H.exe_lib[1],
                           "%s/../lib/rpcplugin", exe) < sizeof H.exe_lib[1])
        H.module_paths[H.nmodule_paths++] = H.exe_lib[1];
    }
  }
  H.module_paths[H.nmodule_paths] = NULL;
}

int main(int argc, char **argv) {
  rpcplugin_manifest *manifest = NULL; /* the infrastructure's */
  rpcplugin_manifest *app = NULL;      /* an application's, or NULL */
  rpcplugin_module *app_mod = NULL;
  rpcplugin_runtime *rt = NULL;
  rpcplugin_runtime_options ro;
  rpcplugin_load_options lo;
  rpcplugin_error err;
  grpc_server *server = NULL;
  grpc_server_credentials *creds = NULL;
  host_tls_cert cert;
  const char *client_pem;
  char addr[PATH_MAX], line[PATH_MAX + 2048], tlserr[512];
  sigset_t set;
  int rc, app_version, grpc_up = 0, started = 0, reason;
  int64_t t0;
  size_t len;

  t0 = now_us();
  memset(&cert, 0, sizeof cert);
  H.orig_out = H.orig_err = H.diag_nb = H.sig_fd = H.wake_fd = -1;
  atomic_store(&H.diag_fd, 2);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  H.full_teardown = 1; /* leak checkers look at the heap at exit */
#endif
  rc = parse_args(argc, argv);
  if (rc >= 0) return rc;

  /* 1. Cookie and version. */
  if (check_cookie()) return 1;
  app_version = negotiate_version();
  if (socket_group() != 0) return 1;
  {
    /* go-plugin >= 1.6 asks for broker multiplexing this way; a plugin
     * that serves it adds a 7th field "true" to the handshake line.  This
     * one does not: the line keeps its fields, and the client decides (one
     * that requires multiplexing reports ErrGRPCBrokerMuxNotSupported). */
    const char *mux = getenv("PLUGIN_MULTIPLEX_GRPC");
    if (mux && *mux) {
      /* Go's strconv.ParseBool, as go-plugin's server reads it. */
      static const char *const yes[] = {"1", "t", "T", "TRUE", "true", "True"};
      static const char *const no[] = {"0", "f", "F", "FALSE", "false",
                                       "False"};
      size_t i;
      int v = -1;
      for (i = 0; i < 6; i++) {
        if (strcmp(mux, yes[i]) == 0) v = 1;
        if (strcmp(mux, no[i]) == 0) v = 0;
      }
      H.mux = v == 1;
      /* go-plugin's server prints "|true" whenever the variable is set,
       * even when it does not multiplex.  This one prints a 7th field only
       * when it does: a client that asks (go-plugin >= 1.6 sets "true")
       * gets it, and a stray false value cannot break an older client,
       * which would read "grpc|false" or "CERT|false" as its 6th field. */
      H.mux_field = H.mux ? "|true" : NULL;
      if (!H.mux)
        early("PLUGIN_MULTIPLEX_GRPC=%s%s: serving without multiplexing "
              "(no 7th handshake field)", mux,
              v < 0 ? " is not a boolean" : "");
    }
    if (!H.mux && H.naccepts > 0)
      early("note: --broker-accept applies with multiplexing only "
            "(PLUGIN_MULTIPLEX_GRPC=true)");
  }

  /* Signals: blocked in every thread (gRPC's included, so set before
   * grpc_init) and read from a signalfd by the main thread. */
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGCHLD);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);
  H.sig_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  H.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  H.orig_err = fcntl(2, F_DUPFD_CLOEXEC, 3);
  if (H.sig_fd < 0 || H.wake_fd < 0) {
    early("cannot set up signal handling: %s", strerror(errno));
    return 1;
  }
  if (H.command) prctl(PR_SET_CHILD_SUBREAPER, 1);

  /* 2. Manifest, certificate, server, module. */
  if (rpcplugin_manifest_load(H.manifest_path, &manifest, &err) != 0) {
    early("%s", err.message);
    return 1;
  }
  if (rpcplugin_manifest_is_application(manifest)) {
    /* An application's manifest: its module serves the application's
     * services, next to the infrastructure module its manifest names. */
    app = manifest;
    manifest = NULL;
    if (rpcplugin_manifest_load_infrastructure(app, &manifest, &err) != 0) {
      early("%s", err.message);
      rpcplugin_manifest_free(app);
      return 1;
    }
  }
  H.fallback = !(rpcplugin_manifest_services(manifest) & RPCPLUGIN_SVC_STDIO);
  client_pem = getenv("PLUGIN_CLIENT_CERT");
  if (client_pem && *client_pem) {
    if (host_tls_check_client_pem(client_pem, tlserr, sizeof tlserr) ||
        host_tls_generate(&cert, tlserr, sizeof tlserr)) {
      early("%s", tlserr);
      goto fail;
    }
  }

  trace_startup("manifest read", t0);
  grpc_init();
  trace_startup("gRPC initialised", t0);
  grpc_up = 1;
  gpr_set_log_function(on_gpr_log);
  {
    /* The transport's limits, explicit (parse_args has the defaults). */
    grpc_arg a[4];
    grpc_channel_args ca = {0, a};
    const char *keys[4] = {GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                           GRPC_ARG_MAX_CONCURRENT_STREAMS,
                           GRPC_ARG_MAX_METADATA_SIZE,
                           GRPC_ARG_MAX_CONNECTION_IDLE_MS};
    long vals[4] = {H.max_recv_bytes, H.max_streams, H.max_metadata,
                    H.idle_ms};
    size_t i;
    for (i = 0; i < 4; i++) {
      if (vals[i] <= 0) continue; /* idle 0: never (gRPC's default) */
      a[ca.num_args].type = GRPC_ARG_INTEGER;
      a[ca.num_args].key = (char *)keys[i];
      a[ca.num_args].value.integer = (int)vals[i];
      ca.num_args++;
    }
    server = grpc_server_create(&ca, NULL);
  }
  trace_startup("server created", t0);
  if (cert.cert_pem) {
    /* AutoMTLS: gRPC's own listener (see listen_on). */
    grpc_ssl_pem_key_cert_pair pair = {cert.key_pem, cert.cert_pem};
    creds = grpc_ssl_server_credentials_create_ex(
        client_pem, &pair, 1,
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY, NULL);
    if (creds == NULL) {
      early("cannot create the server credentials");
      goto fail;
    }
    if (H.max_connections_set && H.max_connections > 0 && !H.mux)
      early(
          "note: --max-connections is not applied with AutoMTLS "
          "(PLUGIN_CLIENT_CERT): gRPC accepts TLS connections itself");
  }
  if (H.mux) {
    /* One connection, ours to accept; the server listens privately. */
    rc = mux_listen(server, creds);
    if (rc == 0) rc = listen_on(server, NULL, addr, sizeof addr);
  } else {
    rc = listen_on(server, creds, addr, sizeof addr);
  }
  trace_startup("listening", t0);
  if (creds) grpc_server_credentials_release(creds);
  if (rc) goto fail;

  memset(&ro, 0, sizeof ro);
  ro.struct_size = sizeof ro;
  ro.server = server;
  ro.on_shutdown = on_shutdown;
  ro.log = on_log;
  ro.log_level = H.log_level;
  /* The infrastructure services never block a poller; an application's
   * handlers may, briefly (a file), and go-plugin's own plugins serve every
   * call on a goroutine of its own: four pollers let four such calls wait
   * at once. */
  ro.poll_threads = H.poll_threads ? (unsigned)H.poll_threads
                    : app          ? 4
                                   : 1;
  if (cert.cert_pem) {
    /* AutoMTLS: connections the plugin makes to the client (broker
     * subchannels and dials) present our certificate and trust only the
     * client's (the runtime copies them). */
    ro.tls_cert_pem = cert.cert_pem;
    ro.tls_key_pem = cert.key_pem;
    ro.tls_peer_cert_pem = client_pem;
  }
  setup_search_path();
  memset(&lo, 0, sizeof lo);
  lo.struct_size = sizeof lo;
  lo.search_path = H.module_paths;
  H.load_opts = &lo;
  if (rpcplugin_runtime_create(&ro, &rt, &err) != 0 ||
      rpcplugin_module_load(rt, manifest, &lo, &H.mod, &err) != 0 ||
      (app && rpcplugin_module_load(rt, app, &lo, &app_mod, &err) != 0)) {
    early("%s", err.message);
    goto fail;
  }
  H.swap_mod = app ? app_mod : H.mod;
  H.rt = rt;
  snprintf(H.infra_path, sizeof H.infra_path, "%s",
           rpcplugin_manifest_path(manifest));
  if (H.swap_to) {
    /* Checked now, so that a typo shows at start and not at the first
     * SIGHUP; it is read again at each swap. */
    rpcplugin_manifest *m2 = NULL;
    if (rpcplugin_manifest_load(H.swap_to, &m2, &err) != 0) {
      early("--swap-to: %s", err.message);
      goto fail;
    }
    rpcplugin_manifest_free(m2);
  }
  /* Server reflection (grpcurl-style tools), as go-plugin's servers have
   * it; registered before grpc_server_start. */
  if (!H.no_reflection &&
      rpcplugin_runtime_enable_reflection(rt, &err) != 0) {
    early("%s", err.message);
    goto fail;
  }
  if ((rc = host_pipes_create(&H.pipes, pipe_sink, NULL,
                              stdio_chunk_bytes(manifest))) != 0) {
    early("cannot create the stdio pipes: %s", strerror(-rc));
    goto fail;
  }
  trace_startup("module loaded", t0);

  /* 3. The handshake: one write, so it is flushed at once.  The socket
   * already listens (listen_on binds and listens), so a client that
   * connects now waits in the kernel's backlog until the server and the
   * acceptor start below; go-plugin's own plugins also print the line
   * before they serve.  What can still fail after it is only the creation
   * of threads. */
  /* go-plugin >= 1.6 reads a 7th field only from a plugin started with
   * PLUGIN_MULTIPLEX_GRPC (older clients split the line into 6 fields);
   * the 6th is then present, empty without AutoMTLS. */
  len = (size_t)snprintf(line, sizeof line, "1|%d|%s|%s|grpc%s%s%s\n",
                         app_version, H.network == NET_UNIX ? "unix" : "tcp",
                         addr, cert.cert_b64 || H.mux_field ? "|" : "",
                         cert.cert_b64 ? cert.cert_b64 : "",
                         H.mux_field ? H.mux_field : "");
  if (write_all(1, line, len) != 0) {
    early("cannot write the handshake line to stdout: %s", strerror(errno));
    goto fail;
  }
  trace_startup("handshake line written", t0);

  grpc_server_start(server);
  started = 1;
  if (rpcplugin_runtime_start(rt, &err) != 0) {
    early("%s", err.message);
    goto fail;
  }
  if ((rc = acceptor_start(server)) != 0) {
    early("cannot start accepting connections: %s", strerror(-rc));
    goto fail;
  }
  /* Without GRPCStdio the reader writes to the original stdout. */
  if (H.fallback) H.orig_out = fcntl(1, F_DUPFD_CLOEXEC, 3);
  if ((rc = host_pipes_start(H.pipes)) != 0) {
    early("cannot start the stdio reader: %s", strerror(-rc));
    goto fail;
  }
  trace_startup("serving", t0);

  /* 4. stdout/stderr through put_line from now on, then the child. */
  if (redirect_stdio() != 0) {
    early("cannot redirect stdout/stderr: %s", strerror(errno));
    goto fail;
  }
  if (H.command) {
    /* A child that could not even start counts as one that ended. */
    if (spawn_child() < 0) H.child_reaped = 1;
    reap();
  }
  if (H.log_level >= RPCPLUGIN_LOG_INFO)
    say("serving %s (%s) on %s %s, app protocol %d%s",
        app ? rpcplugin_manifest_name(app) : rpcplugin_manifest_name(manifest),
        app ? rpcplugin_module_path(app_mod) : rpcplugin_module_path(H.mod),
        H.network == NET_UNIX ? "unix" : "tcp", addr, app_version,
        cert.cert_b64 ? ", AutoMTLS" : "");

  if (H.command && H.child_reaped && H.exit_with_child)
    reason = R_CHILD;
  else
    reason = main_loop();
  if (reason == R_CHILD && !H.fallback) {
    int64_t exit_ms = rp_mono_ms();
    long flush_ms = (long)stdio_setting(manifest, "flush_deadline_ms", 1000);
    /* The rest of the child's process group goes first: what it wrote is
     * then all in the pipes. */
    terminate_group();
    reason = serve_until_flushed(exit_ms, flush_ms);
  }
  if (H.log_level >= RPCPLUGIN_LOG_INFO)
    say("shutting down (%s)", reason == R_SHUTDOWN && atomic_load(&H.mux_ended)
                                  ? "the multiplexed connection ended"
                              : reason == R_SHUTDOWN ? "Shutdown requested"
                              : reason == R_CHILD  ? "child exited"
                                                   : "signal");

  if (H.log_level >= RPCPLUGIN_LOG_DEBUG) log_stats();

  /* The graceful path. */
  t0 = now_us();
  terminate_group();
  trace_phase("child group ended", t0);
  release_stdio();
  host_pipes_stop(H.pipes, DRAIN_MS);
  if (!host_pipes_wait(H.pipes, DRAIN_WAIT_MS) &&
      H.log_level >= RPCPLUGIN_LOG_INFO)
    say("stdio reader still blocked in put_line; shutting down anyway");
  trace_phase("pipes drained", t0);
  /* Stop accepting, flush and end the streams, stop the module, let the
   * connections close once their last replies were read. */
  acceptor_stop();
  rpcplugin_runtime_drain(rt);
  trace_phase("runtime drained", t0);
  {
    host_pipes_stats ps;
    host_pipes_get_stats(H.pipes, &ps);
    if (ps.bytes_lost && H.log_level >= RPCPLUGIN_LOG_INFO)
      say("stdio: put_line refused %llu of the %llu bytes read (queue full "
          "or shut down)",
          (unsigned long long)ps.bytes_lost, (unsigned long long)ps.bytes_read);
  }
  /* Everything a client or the file system can see is done now: the
   * replies and the queued output went out, streams ended with OK, the
   * module stopped.  Remove the socket, and exit. */
  remove_socket();
  if (!H.full_teardown) {
    /* What is left is memory, threads and mappings of this process: the
     * rest of the runtime's shutdown (cutting connections still open after
     * the grace, joining the pollers), unloading the module, destroying the server and gRPC's
     * global teardown (with the exit handlers of ~60 shared libraries)
     * would only make a go-plugin client's Kill() wait for what the kernel
     * does anyway.  --full-teardown (always under sanitizers) runs it all. */
    trace_phase("exit", t0);
    fflush(NULL);
    _exit(0);
  }
  rpcplugin_runtime_shutdown(rt);
  trace_phase("runtime shut down", t0);
  host_pipes_destroy(H.pipes);
  H.pipes = NULL;
  rpcplugin_runtime_destroy(rt);
  trace_phase("module unloaded", t0);
  grpc_server_destroy(server);
  acceptor_free();
  rpcplugin_manifest_free(manifest);
  rpcplugin_manifest_free(app);
  host_tls_free(&cert);
  grpc_shutdown_blocking();
  trace_phase("gRPC shut down", t0);
  return 0;

fail:
  /* Before the handshake (or right at it): undo and exit 1. */
  if (H.pipes && started) host_pipes_stop(H.pipes, 0);
  acceptor_stop();
  if (rt) rpcplugin_runtime_shutdown(rt);
  if (H.pipes) host_pipes_destroy(H.pipes);
  if (rt) rpcplugin_runtime_destroy(rt);
  if (server) grpc_server_destroy(server);
  acceptor_free();
  remove_socket();
  rpcplugin_manifest_free(manifest);
  rpcplugin_manifest_free(app);
  host_tls_free(&cert);
  if (grpc_up) grpc_shutdown_blocking();
  return 1;
}
