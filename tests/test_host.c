/*
 * test_host.c - a small host for the integration tests: creates a server,
 * loads a manifest's module through the loader, serves, and obeys commands
 * on stdin so a test can drive put_line and the broker API.
 *
 *   test_host MANIFEST ADDRESS
 *
 * ADDRESS is a gRPC listen address ("unix:/path", "127.0.0.1:0").  The
 * host prints "READY <port>" once serving, "SHUTDOWN_REQUESTED" when the
 * module's shutdown callback runs, and "EXIT <code>" last.  Commands, one
 * per line, each answered by one line "OK ..." or "ERR <name> <message>":
 *
 *   put CH HEX             put_line(CH, bytes)
 *   putseq CH N SIZE       N chunks of SIZE bytes: "%08d" sequence number,
 *                          then 'a'..'z', the last byte '\n'
 *   putbig CH SIZE         one chunk of SIZE bytes, byte i = i % 251
 *   stats                  counters as "OK key=value ..."
 *   advertise ID NET ADDR  broker_advertise
 *   waitadv ID MS          broker_wait_advertised -> "OK NET ADDR"
 *   knock ID NET ADDR MS   broker_knock
 *   subhealth ID           Health/Check over the subchannel's channel
 *   dialadv ID MS          wait for the peer's advertisement of ID, dial it
 *                          (go-plugin's Dial) and call Health/Check on it
 *   subserve PATH MANIFEST serve MANIFEST's module on a second server at
 *                          unix:PATH (a target for the peer's Dial)
 *   abi                    the loaded module's name, ABI and handover
 *   swap MANIFEST          rpcplugin_module_swap to MANIFEST's module
 *                          ("OK swap handover=yes|no")
 *   shutdown               run the shutdown path
 *   bg COMMAND             run COMMAND on a thread of its own; its reply
 *                          comes later as "BGDONE <reply>"
 *
 * Signals SIGTERM and SIGINT also run the shutdown path.  With
 * TEST_HOST_DEBUG set the runtime logs at debug level (shutdown steps).
 *
 * With TEST_HOST_TLS_CERT, TEST_HOST_TLS_KEY and TEST_HOST_TLS_PEER (PEM
 * files) the runtime gets them as AutoMTLS material (the module's broker
 * subchannels then use TLS); the host's own listener stays plaintext.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <rpcplugin/host.h>

static sem_t stop_sem;
static rpcplugin_module *mod;
static const rpcplugin_module_api *api;
static pthread_rwlock_t mod_lock = PTHREAD_RWLOCK_INITIALIZER;
static int stopping;
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

/* Set on threads running a "bg" command: their replies are events. */
static __thread int in_bg;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  va_list ap;
  pthread_mutex_lock(&out_mu);
  if (in_bg) fputs("BGDONE ", stdout);
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
  pthread_mutex_unlock(&out_mu);
}

static void on_shutdown(void *ud) {
  (void)ud;
  say("SHUTDOWN_REQUESTED");
  sem_post(&stop_sem);
}

static void on_log(void *ud, int level, const char *msg) {
  (void)ud;
  fprintf(stderr, "[log %d] %s\n", level, msg);
}

static void *signal_thread(void *arg) {
  sigset_t *set = arg;
  int sig;
  if (sigwait(set, &sig) == 0) sem_post(&stop_sem);
  return NULL;
}

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static void report(int rc, const char *what) {
  if (rc == 0)
    say("OK %s", what);
  else
    say("ERR %s %s", rpcplugin_err_name(rc), what);
}

/* A unary Health/Check with service "" over a borrowed channel. */
static int sub_health(grpc_channel *ch, char *out, size_t outlen) {
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_slice method = grpc_slice_from_static_string(
      "/grpc.health.v1.Health/Check");
  gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                                 gpr_time_from_seconds(5, GPR_TIMESPAN));
  grpc_call *call = grpc_channel_create_call(ch, NULL, 0, cq, method, NULL,
                                             dl, NULL);
  grpc_slice empty = grpc_empty_slice();
  grpc_byte_buffer *req = grpc_raw_byte_buffer_create(&empty, 0);
  grpc_byte_buffer *resp = NULL;
  grpc_metadata_array md, tmd;
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details;
  grpc_op ops[6];
  grpc_event ev;
  memset(ops, 0, sizeof ops);
  grpc_metadata_array_init(&md);
  grpc_metadata_array_init(&tmd);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &resp;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &tmd;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  grpc_call_start_batch(call, ops, 6, (void *)1, NULL);
  ev = grpc_completion_queue_pluck(cq, (void *)1,
                                   gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  snprintf(out, outlen, "status=%d bytes=%zu", (int)status,
           resp ? grpc_byte_buffer_length(resp) : (size_t)0);
  (void)ev;
  if (resp) grpc_byte_buffer_destroy(resp);
  grpc_byte_buffer_destroy(req);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md);
  grpc_metadata_array_destroy(&tmd);
  grpc_call_unref(call);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
             .type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
  return status == GRPC_STATUS_OK ? 0 : -1;
}

/* A second server with its own runtime, for brokered connections. */
static grpc_server *sub_server;
static rpcplugin_runtime *sub_rt;
static rpcplugin_manifest *sub_manifest;

static int sub_serve(const char *path, const char *manifest) {
  rpcplugin_runtime_options o;
  rpcplugin_error err;
  rpcplugin_module *m2;
  grpc_server_credentials *creds;
  char addr[300];
  int rc;
  if (sub_server) return RPCPLUGIN_EEXIST;
  rc = rpcplugin_manifest_load(manifest, &sub_manifest, &err);
  if (rc) {
    fprintf(stderr, "%s\n", err.message);
    return rc;
  }
  sub_server = grpc_server_create(NULL, NULL);
  creds = grpc_insecure_server_credentials_create();
  snprintf(addr, sizeof addr, "unix:%s", path);
  if (grpc_server_add_http2_port(sub_server, addr, creds) <= 0) rc = -1;
  grpc_server_credentials_release(creds);
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = sub_server;
  o.log = on_log;
  if (rc == 0) rc = rpcplugin_runtime_create(&o, &sub_rt, &err);
  if (rc == 0) rc = rpcplugin_module_load(sub_rt, sub_manifest, NULL, &m2, &err);
  if (rc) {
    fprintf(stderr, "%s\n", err.message);
    return rc ? rc : RPCPLUGIN_EIO;
  }
  grpc_server_start(sub_server);
  return rpcplugin_runtime_start(sub_rt, &err);
}

static void sub_stop(void) {
  if (sub_rt) {
    rpcplugin_runtime_destroy(sub_rt);
    sub_rt = NULL;
  }
  if (sub_server) {
    grpc_server_destroy(sub_server);
    sub_server = NULL;
  }
  rpcplugin_manifest_free(sub_manifest);
  sub_manifest = NULL;
}

static void command(char *line) {
  char *argv[8];
  int argc = 0;
  char *save = NULL, *tok;
  void *inst = rpcplugin_module_instance(mod);
  for (tok = strtok_r(line, " \t\r\n", &save); tok && argc < 8;
       tok = strtok_r(NULL, " \t\r\n", &save))
    argv[argc++] = tok;
  if (argc == 0) return;

  if (strcmp(argv[0], "put") == 0 && argc == 3) {
    size_t n = strlen(argv[2]) / 2, i;
    unsigned char *buf = malloc(n + 1);
    for (i = 0; i < n; i++)
      buf[i] = (unsigned char)(hexval(argv[2][2 * i]) * 16 +
                               hexval(argv[2][2 * i + 1]));
    report(rpcplugin_module_put_line(mod, atoi(argv[1]), buf, n), "put");
    free(buf);
  } else if (strcmp(argv[0], "putseq") == 0 && argc == 4) {
    int ch = atoi(argv[1]);
    long n = atol(argv[2]), i;
    size_t size = (size_t)atol(argv[3]), k;
    char *buf = malloc(size + 16);
    int rc = 0;
    long ok = 0;
    for (i = 0; i < n; i++) {
      snprintf(buf, size + 16, "%08ld", i);
      for (k = 8; k < size; k++) buf[k] = (char)('a' + (k % 26));
      buf[size - 1] = '\n';
      rc = rpcplugin_module_put_line(mod, ch, buf, size);
      if (rc == 0) ok++;
      else if (rc != RPCPLUGIN_EDROPPED) break;
    }
    free(buf);
    say("%s putseq %ld", (rc == 0 || rc == RPCPLUGIN_EDROPPED) ? "OK" : "ERR",
        ok);
  } else if (strcmp(argv[0], "putbig") == 0 && argc == 3) {
    size_t size = (size_t)atol(argv[2]), k;
    unsigned char *buf = malloc(size);
    for (k = 0; k < size; k++) buf[k] = (unsigned char)(k % 251);
    report(rpcplugin_module_put_line(mod, atoi(argv[1]), buf, size), "putbig");
    free(buf);
  } else if (strcmp(argv[0], "stats") == 0) {
    rpcplugin_stats s;
    int rc;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    rc = rpcplugin_module_get_stats(mod, &s);
    if (rc) {
      report(rc, "stats");
      return;
    }
    say("OK queued_chunks=%llu queued_bytes=%llu sent_chunks=%llu "
        "sent_bytes=%llu sent_messages=%llu dropped_chunks=%llu "
        "dropped_bytes=%llu queue_bytes=%llu blocked_puts=%llu "
        "timed_out_puts=%llu broker_streams=%llu broker_subchannels=%llu "
        "broker_in=%llu broker_out=%llu broker_errors=%llu "
        "calls_active=%llu calls_total=%llu resent_messages=%llu",
        (unsigned long long)s.stdio_queued_chunks,
        (unsigned long long)s.stdio_queued_bytes,
        (unsigned long long)s.stdio_sent_chunks,
        (unsigned long long)s.stdio_sent_bytes,
        (unsigned long long)s.stdio_sent_messages,
        (unsigned long long)s.stdio_dropped_chunks,
        (unsigned long long)s.stdio_dropped_bytes,
        (unsigned long long)s.stdio_queue_bytes,
        (unsigned long long)s.stdio_blocked_puts,
        (unsigned long long)s.stdio_timed_out_puts,
        (unsigned long long)s.broker_streams,
        (unsigned long long)s.broker_subchannels,
        (unsigned long long)s.broker_messages_in,
        (unsigned long long)s.broker_messages_out,
        (unsigned long long)s.broker_errors,
        (unsigned long long)s.calls_active,
        (unsigned long long)s.calls_total,
        (unsigned long long)s.stdio_resent_messages);
  } else if (strcmp(argv[0], "advertise") == 0 && argc == 4) {
    if (!RPCPLUGIN_MODULE_HAS(api, broker_advertise)) {
      report(RPCPLUGIN_EUNSUPPORTED, "advertise");
      return;
    }
    report(api->broker_advertise(inst, (uint32_t)atol(argv[1]), argv[2],
                                 argv[3]),
           "advertise");
  } else if (strcmp(argv[0], "waitadv") == 0 && argc == 3) {
    rpcplugin_conn_info ci;
    int rc;
    if (!RPCPLUGIN_MODULE_HAS(api, broker_wait_advertised)) {
      report(RPCPLUGIN_EUNSUPPORTED, "waitadv");
      return;
    }
    rc = api->broker_wait_advertised(inst, (uint32_t)atol(argv[1]),
                                     atoi(argv[2]), &ci);
    if (rc == 0)
      say("OK %s %s", ci.network, ci.address);
    else
      report(rc, "waitadv");
  } else if (strcmp(argv[0], "knock") == 0 && argc == 5) {
    char err[256];
    int rc;
    if (!RPCPLUGIN_MODULE_HAS(api, broker_knock)) {
      report(RPCPLUGIN_EUNSUPPORTED, "knock");
      return;
    }
    rc = api->broker_knock(inst, (uint32_t)atol(argv[1]), argv[2], argv[3],
                           atoi(argv[4]), err, sizeof err);
    if (rc == 0)
      say("OK knock");
    else
      say("ERR %s %s", rpcplugin_err_name(rc), err);
  } else if (strcmp(argv[0], "subhealth") == 0 && argc == 2) {
    grpc_channel *ch = NULL;
    char res[128];
    int rc;
    if (!RPCPLUGIN_MODULE_HAS(api, broker_channel)) {
      report(RPCPLUGIN_EUNSUPPORTED, "subhealth");
      return;
    }
    rc = api->broker_channel(inst, (uint32_t)atol(argv[1]), &ch);
    if (rc) {
      report(rc, "subhealth");
      return;
    }
    rc = sub_health(ch, res, sizeof res);
    api->broker_release_channel(inst, ch);
    say("%s %s", rc == 0 ? "OK" : "ERR", res);
  } else if (strcmp(argv[0], "dialadv") == 0 && argc == 3) {
    rpcplugin_conn_info ci;
    char target[300], res[128];
    grpc_channel *ch;
    grpc_channel_credentials *creds;
    int rc;
    if (!RPCPLUGIN_MODULE_HAS(api, broker_wait_advertised)) {
      report(RPCPLUGIN_EUNSUPPORTED, "dialadv");
      return;
    }
    rc = api->broker_wait_advertised(inst, (uint32_t)atol(argv[1]),
                                     atoi(argv[2]), &ci);
    if (rc) {
      report(rc, "dialadv");
      return;
    }
    snprintf(target, sizeof target, "%s%s",
             strcmp(ci.network, "unix") == 0 ? "unix:" : "", ci.address);
    creds = grpc_insecure_credentials_create();
    ch = grpc_channel_create(target, creds, NULL);
    grpc_channel_credentials_release(creds);
    rc = sub_health(ch, res, sizeof res);
    grpc_channel_destroy(ch);
    say("%s %s", rc == 0 ? "OK" : "ERR", res);
  } else if (strcmp(argv[0], "subserve") == 0 && argc == 3) {
    report(sub_serve(argv[1], argv[2]), "subserve");
  } else if (strcmp(argv[0], "abi") == 0) {
    say("OK %s %d.%d struct_size=%u handover=%s", api->name,
        (int)api->abi_major, (int)api->abi_minor, (unsigned)api->struct_size,
        RPCPLUGIN_MODULE_HAS(api, handover_out) ? "yes" : "no");
  } else if (strcmp(argv[0], "swap") == 0 && argc == 2) {
    rpcplugin_manifest *m2 = NULL;
    rpcplugin_swap_info si;
    rpcplugin_error err;
    int rc = rpcplugin_manifest_load(argv[1], &m2, &err);
    if (rc == 0) {
      memset(&si, 0, sizeof si);
      si.struct_size = sizeof si;
      rc = rpcplugin_module_swap(mod, m2, NULL, &si, &err);
      rpcplugin_manifest_free(m2);
    }
    if (rc) {
      say("ERR %s %s", rpcplugin_err_name(rc), err.message);
      return;
    }
    api = rpcplugin_module_api_of(mod);
    say("OK swap handover=%s", si.handover == 0 ? "yes" : "no");
  } else if (strcmp(argv[0], "shutdown") == 0) {
    say("OK shutdown");
    sem_post(&stop_sem);
  } else {
    say("ERR RPCPLUGIN_EINVAL unknown command %s", argv[0]);
  }
}

static void *bg_thread(void *arg) {
  char *line = arg;
  in_bg = 1;
  pthread_rwlock_rdlock(&mod_lock);
  if (!stopping) command(line);
  pthread_rwlock_unlock(&mod_lock);
  free(line);
  return NULL;
}

static void *command_thread(void *arg) {
  char line[1 << 16];
  (void)arg;
  while (fgets(line, sizeof line, stdin)) {
    if (strncmp(line, "bg ", 3) == 0) {
      pthread_t t;
      char *copy = strdup(line + 3);
      if (copy && pthread_create(&t, NULL, bg_thread, copy) == 0) {
        pthread_detach(t);
        say("OK bg");
      } else {
        free(copy);
        say("ERR RPCPLUGIN_ENOMEM bg");
      }
      continue;
    }
    pthread_rwlock_rdlock(&mod_lock);
    if (!stopping) command(line);
    pthread_rwlock_unlock(&mod_lock);
  }
  return NULL;
}

/* A whole file as a string (NULL when unset or unreadable). */
static char *read_env_file(const char *var) {
  const char *path = getenv(var);
  FILE *f;
  char *buf;
  long n;
  if (path == NULL || *path == '\0') return NULL;
  f = fopen(path, "rb");
  if (f == NULL) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
      fseek(f, 0, SEEK_SET) != 0 || (buf = malloc((size_t)n + 1)) == NULL) {
    fclose(f);
    return NULL;
  }
  if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    fclose(f);
    return NULL;
  }
  buf[n] = '\0';
  fclose(f);
  return buf;
}

int main(int argc, char **argv) {
  char *tls_cert = read_env_file("TEST_HOST_TLS_CERT");
  char *tls_key = read_env_file("TEST_HOST_TLS_KEY");
  char *tls_peer = read_env_file("TEST_HOST_TLS_PEER");
  rpcplugin_manifest *m = NULL;
  rpcplugin_runtime *rt = NULL;
  rpcplugin_runtime_options opts;
  rpcplugin_error err;
  grpc_server *server;
  grpc_server_credentials *creds;
  sigset_t set;
  pthread_t sig_tid, cmd_tid;
  int port, rc;

  if (argc != 3) {
    fprintf(stderr, "usage: %s MANIFEST ADDRESS\n", argv[0]);
    return 2;
  }
  sem_init(&stop_sem, 0, 0);
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  pthread_create(&sig_tid, NULL, signal_thread, &set);
  pthread_detach(sig_tid);

  rc = rpcplugin_manifest_load(argv[1], &m, &err);
  if (rc) {
    fprintf(stderr, "%s\n", err.message);
    say("EXIT 1");
    return 1;
  }
  grpc_init();
  server = grpc_server_create(NULL, NULL);
  creds = grpc_insecure_server_credentials_create();
  port = grpc_server_add_http2_port(server, argv[2], creds);
  grpc_server_credentials_release(creds);
  if (port <= 0) {
    fprintf(stderr, "cannot listen on %s\n", argv[2]);
    grpc_server_destroy(server);
    rpcplugin_manifest_free(m);
    grpc_shutdown();
    say("EXIT 1");
    return 1;
  }
  memset(&opts, 0, sizeof opts);
  opts.struct_size = sizeof opts;
  opts.server = server;
  opts.on_shutdown = on_shutdown;
  opts.log = on_log;
  opts.log_level = getenv("TEST_HOST_DEBUG") ? RPCPLUGIN_LOG_DEBUG : RPCPLUGIN_LOG_INFO;
  opts.tls_cert_pem = tls_cert;
  opts.tls_key_pem = tls_key;
  opts.tls_peer_cert_pem = tls_peer;
  rc = rpcplugin_runtime_create(&opts, &rt, &err);
  if (rc == 0) rc = rpcplugin_module_load(rt, m, NULL, &mod, &err);
  if (rc) {
    fprintf(stderr, "%s\n", err.message);
    rpcplugin_runtime_destroy(rt);
    grpc_server_destroy(server);
    rpcplugin_manifest_free(m);
    grpc_shutdown();
    say("EXIT 1");
    return 1;
  }
  api = rpcplugin_module_api_of(mod);
  grpc_server_start(server);
  rc = rpcplugin_runtime_start(rt, &err);
  if (rc) fprintf(stderr, "%s\n", err.message);
  say("READY %d", port);
  pthread_create(&cmd_tid, NULL, command_thread, NULL);
  pthread_detach(cmd_tid);

  while (sem_wait(&stop_sem) != 0 && errno == EINTR) {
  }
  rpcplugin_runtime_shutdown(rt);
  /* Commands still running (a blocked put_line) now return; wait for them,
   * then free the module. */
  pthread_rwlock_wrlock(&mod_lock);
  stopping = 1;
  pthread_rwlock_unlock(&mod_lock);
  rpcplugin_runtime_destroy(rt);
  grpc_server_destroy(server);
  sub_stop();
  rpcplugin_manifest_free(m);
  grpc_shutdown_blocking();
  free(tls_cert);
  free(tls_key);
  free(tls_peer);
  say("EXIT 0");
  return 0;
}
