/*
 * rpb_cycles.c - W5: module cycles in one process.
 *
 *   rpb_cycles MODE MANIFEST N SOCKDIR
 *
 * MODE says what one cycle is:
 *   module   on one started server and runtime: read the manifest,
 *            load (dlopen + ABI check + init + register + start), then
 *            unload (shutdown + destroy + dlclose).  The methods were
 *            registered once, before grpc_server_start, by a first module
 *            that was unloaded again; later modules re-bind those routes.
 *   full     everything a fresh host does: grpc_server_create + a unix
 *            port + runtime_create + the module cycle above +
 *            grpc_server_start + runtime_start + runtime_shutdown +
 *            runtime_destroy + grpc_server_destroy.  Needed when methods
 *            change, since the C core fixes them at grpc_server_start.
 *   runtime  the same as full without any module (what full costs by
 *            itself; full - runtime is the module's share).
 *   server   a bare grpc_server with one completion queue and port:
 *            create, start, shutdown, drain, destroy.
 *
 * Prints "RESULT {json}": per-cycle microseconds (p50, p99, mean, first),
 * and RSS and open descriptors after cycle 1, 10, 100 and the last.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <rpcplugin/host.h>

#include "bench_util.h"

static void fail(const char *what, const rpcplugin_error *err) {
  rpb_say("ERR %s: %s", what, err ? err->message : "");
  exit(1);
}

static grpc_server *new_server(const char *addr) {
  grpc_server *s = grpc_server_create(NULL, NULL);
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  if (grpc_server_add_http2_port(s, addr, creds) <= 0) fail("listen", NULL);
  grpc_server_credentials_release(creds);
  return s;
}

static rpcplugin_runtime *new_runtime(grpc_server *s) {
  rpcplugin_runtime_options o;
  rpcplugin_runtime *rt;
  rpcplugin_error err;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = s;
  if (rpcplugin_runtime_create(&o, &rt, &err) != 0)
    fail("runtime_create", &err);
  return rt;
}

static rpcplugin_module *load(rpcplugin_runtime *rt, const char *manifest,
                              rpcplugin_manifest **m) {
  rpcplugin_module *mod;
  rpcplugin_error err;
  if (rpcplugin_manifest_load(manifest, m, &err) != 0)
    fail("manifest_load", &err);
  if (rpcplugin_module_load(rt, *m, NULL, &mod, &err) != 0)
    fail("module_load", &err);
  return mod;
}

static void bare_server_cycle(const char *addr) {
  grpc_server *s = new_server(addr);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
  grpc_event ev;
  grpc_server_register_completion_queue(s, cq, NULL);
  grpc_server_start(s);
  grpc_server_shutdown_and_notify(s, cq, (void *)1);
  grpc_server_cancel_all_calls(s);
  ev = grpc_completion_queue_next(cq, rpb_deadline_ms(10000), NULL);
  if (ev.type != GRPC_OP_COMPLETE) fail("server shutdown", NULL);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_next(cq, rpb_deadline_ms(10000), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_server_destroy(s);
  grpc_completion_queue_destroy(cq);
}

int main(int argc, char **argv) {
  const char *mode, *manifest, *dir;
  char addr[300], path[280];
  long n, i;
  double *v, *v_load, *v_unload;
  long rss[4] = {0}, fds[4] = {0}, marks[4];
  int k = 0;
  grpc_server *server = NULL;
  rpcplugin_runtime *rt = NULL;
  rpcplugin_error err;
  uint64_t tall0, tall1;

  if (argc != 5) {
    fprintf(stderr,
            "usage: rpb_cycles module|full|runtime|server MANIFEST "
            "N SOCKDIR\n");
    return 2;
  }
  mode = argv[1];
  manifest = argv[2];
  n = atol(argv[3]);
  dir = argv[4];
  if (n < 1) return 2;
  snprintf(path, sizeof path, "%s/cycles.sock", dir);
  snprintf(addr, sizeof addr, "unix:%s", path);
  marks[0] = 1;
  marks[1] = n >= 10 ? 10 : n;
  marks[2] = n >= 100 ? 100 : n;
  marks[3] = n;
  v = calloc((size_t)n, sizeof *v);
  v_load = calloc((size_t)n, sizeof *v);
  v_unload = calloc((size_t)n, sizeof *v);
  grpc_init(); /* held for the whole run, as a host does */

  if (strcmp(mode, "module") == 0) {
    rpcplugin_manifest *m;
    rpcplugin_module *first;
    unlink(path);
    server = new_server(addr);
    rt = new_runtime(server);
    first = load(rt, manifest, &m);
    grpc_server_start(server);
    if (rpcplugin_runtime_start(rt, &err) != 0) fail("runtime_start", &err);
    if (rpcplugin_module_unload(first) != 0) fail("unload", NULL);
    rpcplugin_manifest_free(m);
  } else if (strcmp(mode, "full") && strcmp(mode, "runtime") &&
             strcmp(mode, "server")) {
    fprintf(stderr, "rpb_cycles: unknown mode %s\n", mode);
    return 2;
  }

  tall0 = rpb_now_ns();
  for (i = 0; i < n; i++) {
    uint64_t t0 = rpb_now_ns(), t1 = t0;
    if (strcmp(mode, "module") == 0) {
      rpcplugin_manifest *m;
      rpcplugin_module *mod = load(rt, manifest, &m);
      t1 = rpb_now_ns();
      if (rpcplugin_module_unload(mod) != 0) fail("unload", NULL);
      rpcplugin_manifest_free(m);
    } else if (strcmp(mode, "server") == 0) {
      unlink(path);
      bare_server_cycle(addr);
    } else {
      rpcplugin_manifest *m = NULL;
      grpc_server *s;
      rpcplugin_runtime *r;
      unlink(path);
      s = new_server(addr);
      r = new_runtime(s);
      if (strcmp(mode, "full") == 0) load(r, manifest, &m);
      grpc_server_start(s);
      if (rpcplugin_runtime_start(r, &err) != 0) fail("runtime_start", &err);
      t1 = rpb_now_ns();
      rpcplugin_runtime_shutdown(r);
      rpcplugin_runtime_destroy(r);
      grpc_server_destroy(s);
      rpcplugin_manifest_free(m);
    }
    {
      uint64_t t2 = rpb_now_ns();
      v[i] = (t2 - t0) / 1e3;
      v_load[i] = (t1 - t0) / 1e3;
      v_unload[i] = (t2 - t1) / 1e3;
    }
    if (k < 4 && i + 1 == marks[k]) {
      while (k < 4 && i + 1 == marks[k]) {
        rss[k] = rpb_rss_kb(0);
        fds[k] = rpb_count_fds(0);
        k++;
      }
    }
  }
  tall1 = rpb_now_ns();

  {
    double first = v[0], mean = (tall1 - tall0) / 1e3 / (double)n;
    double p50 = rpb_quantile(v, (size_t)n, 0.5);
    double p99 = rpb_quantile(v, (size_t)n, 0.99);
    double max = v[n - 1];
    double l50 = rpb_quantile(v_load, (size_t)n, 0.5);
    double u50 = rpb_quantile(v_unload, (size_t)n, 0.5);
    rpb_say(
        "RESULT {\"mode\": \"%s\", \"n\": %ld, \"first_us\": %.1f, "
        "\"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
        "\"mean_us\": %.1f, \"up_p50_us\": %.1f, \"down_p50_us\": %.1f, "
        "\"rss_kb\": [%ld, %ld, %ld, %ld], \"fds\": [%ld, %ld, %ld, %ld], "
        "\"marks\": [%ld, %ld, %ld, %ld]}",
        mode, n, first, p50, p99, max, mean, l50, u50, rss[0], rss[1], rss[2],
        rss[3], fds[0], fds[1], fds[2], fds[3], marks[0], marks[1], marks[2],
        marks[3]);
  }
  if (rt) {
    rpcplugin_runtime_shutdown(rt);
    rpcplugin_runtime_destroy(rt);
    grpc_server_destroy(server);
  }
  unlink(path);
  free(v);
  free(v_load);
  free(v_unload);
  grpc_shutdown_blocking();
  return 0;
}
