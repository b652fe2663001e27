/*
 * test_cycles.c - cold cycles in one process leave nothing behind.
 *
 *   test_cycles MODULE_DIR MANIFEST [N]
 *
 * Two loops, N cycles each (default 1000):
 *   module  on one started server and runtime: load the manifest's module
 *           (dlopen, ABI check, init, register, start), then unload it
 *           (shutdown, destroy, dlclose);
 *   full    a fresh grpc_server, runtime and module, started, shut down,
 *           destroyed: what a host that serves, stops and starts again does.
 * After a warm-up of 20 cycles (gRPC's lazily made globals, malloc's
 * arenas) the process's threads, open descriptors and RSS are the
 * baseline; after the last cycle descriptors must equal it, threads may
 * exceed it by two at most (gRPC's pools), and RSS may not have grown by
 * more than 2 MiB (about 2 KiB a cycle: a leak of one small allocation per
 * cycle shows up).
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <rpcplugin/host.h>

#include "check.h"

#define WARMUP 20
#define RSS_SLACK_KB 2048

/* Under AddressSanitizer freed memory waits in a quarantine and RSS grows
 * by design: LeakSanitizer checks the heap at exit instead, and fewer
 * cycles keep the run short. */
#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif
#ifndef UNDER_ASAN
#define UNDER_ASAN 0
#endif

static const char *manifest_path;
static const char *const *search_path;

static long count_dir(const char *path) {
  DIR *d = opendir(path);
  struct dirent *e;
  long n = 0;
  if (d == NULL) return -1;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.') n++;
  closedir(d);
  return n - 1; /* opendir's own descriptor, for /proc/self/fd */
}

static long rss_kb(void) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long kb = -1;
  if (f == NULL) return -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "VmRSS:", 6) == 0) kb = atol(line + 6);
  fclose(f);
  return kb;
}

typedef struct sample {
  long threads, fds, rss;
} sample;

static sample take(void) {
  sample s;
  s.threads = count_dir("/proc/self/task") + 1; /* no opendir fd there */
  s.fds = count_dir("/proc/self/fd");
  s.rss = rss_kb();
  return s;
}

static grpc_server *new_server(const char *addr) {
  grpc_server *s = grpc_server_create(NULL, NULL);
  grpc_server_credentials *creds = grpc_insecure_server_credentials_create();
  CHECK(grpc_server_add_http2_port(s, addr, creds) > 0);
  grpc_server_credentials_release(creds);
  return s;
}

static rpcplugin_runtime *new_runtime(grpc_server *s) {
  rpcplugin_runtime_options o;
  rpcplugin_runtime *rt = NULL;
  rpcplugin_error err;
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = s;
  CHECK_EQ_INT(rpcplugin_runtime_create(&o, &rt, &err), 0);
  return rt;
}

static rpcplugin_module *load(rpcplugin_runtime *rt) {
  rpcplugin_manifest *m = NULL;
  rpcplugin_module *mod = NULL;
  rpcplugin_load_options lo;
  rpcplugin_error err;
  memset(&lo, 0, sizeof lo);
  lo.struct_size = sizeof lo;
  lo.search_path = search_path;
  CHECK_EQ_INT(rpcplugin_manifest_load(manifest_path, &m, &err), 0);
  if (m == NULL) return NULL;
  if (rpcplugin_module_load(rt, m, &lo, &mod, &err) != 0)
    fprintf(stderr, "module_load: %s\n", err.message);
  rpcplugin_manifest_free(m);
  return mod;
}

static void full_cycle(const char *addr) {
  grpc_server *s = new_server(addr);
  rpcplugin_runtime *rt = new_runtime(s);
  rpcplugin_error err;
  CHECK(load(rt) != NULL);
  grpc_server_start(s);
  CHECK_EQ_INT(rpcplugin_runtime_start(rt, &err), 0);
  CHECK_EQ_INT(rpcplugin_runtime_shutdown(rt), 0);
  rpcplugin_runtime_destroy(rt); /* unloads the module */
  grpc_server_destroy(s);
}

/* The process after the cycles: gRPC's own thread pools grow and shrink
 * by themselves (an idle worker exits a moment later), so give them up to
 * 2 s to come back to the baseline, then allow two threads more: a thread
 * or descriptor left per cycle would be hundreds. */
static sample settle(sample base) {
  sample s = take();
  int i;
  for (i = 0; i < 200 && (s.threads > base.threads || s.fds != base.fds);
       i++) {
    usleep(10000); /* no event tells that a thread exited: look again */
    s = take();
  }
  return s;
}

static void check_back(const char *what, sample base, sample end, long n) {
  fprintf(stderr,
          "%s x%ld: threads %ld -> %ld, fds %ld -> %ld, RSS %ld -> %ld KiB\n",
          what, n, base.threads, end.threads, base.fds, end.fds, base.rss,
          end.rss);
  CHECK(end.threads <= base.threads + 2);
  CHECK_EQ_INT((int)end.fds, (int)base.fds);
  /* Under ASan or valgrind (RP_CYCLES_NO_RSS, set by tests/run.sh) RSS is
   * the tool's: leaks are what those runs check. */
  if (!UNDER_ASAN && getenv("RP_CYCLES_NO_RSS") == NULL)
    CHECK(end.rss - base.rss <= RSS_SLACK_KB);
}

int main(int argc, char **argv) {
  const char *paths[2];
  char addr[256];
  long n = argc > 3 ? atol(argv[3]) : UNDER_ASAN ? 200 : 1000, i;
  sample base;
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODULE_DIR MANIFEST [N]\n", argv[0]);
    return 2;
  }
  paths[0] = argv[1];
  paths[1] = NULL;
  search_path = paths;
  manifest_path = argv[2];
  snprintf(addr, sizeof addr, "unix:/tmp/rp-cycles-%d.sock", (int)getpid());
  grpc_init();

  /* module cycles on one live server */
  {
    grpc_server *s = new_server(addr);
    rpcplugin_runtime *rt = new_runtime(s);
    rpcplugin_module *first = load(rt); /* registers the methods */
    rpcplugin_error err;
    CHECK(first != NULL);
    grpc_server_start(s);
    CHECK_EQ_INT(rpcplugin_runtime_start(rt, &err), 0);
    CHECK_EQ_INT(rpcplugin_module_unload(first), 0);
    for (i = 0; i < n + WARMUP; i++) {
      rpcplugin_module *mod;
      if (i == WARMUP) base = take();
      mod = load(rt); /* re-binds the registered routes, starts */
      CHECK(mod != NULL);
      if (mod == NULL) break;
      CHECK_EQ_INT(rpcplugin_module_unload(mod), 0);
    }
    check_back("module", base, settle(base), n);
    CHECK_EQ_INT(rpcplugin_runtime_shutdown(rt), 0);
    rpcplugin_runtime_destroy(rt);
    grpc_server_destroy(s);
  }

  /* full cold cycles */
  for (i = 0; i < n + WARMUP; i++) {
    if (i == WARMUP) base = take();
    full_cycle(addr);
  }
  check_back("full", base, settle(base), n);

  unlink(addr + 5);
  grpc_shutdown();
  return check_report("test_cycles");
}
