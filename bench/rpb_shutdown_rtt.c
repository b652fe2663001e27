/*
 * rpb_shutdown_rtt.c - round trip of plugin.GRPCController/Shutdown over a
 * unix socket, N sequential calls on one channel, against the module
 * loaded in this process (the host's shutdown callback only counts, so the
 * server stays up).  Health/Check is measured in the same run as the
 * anchor: the same unary path with a different handler.
 *
 *   rpb_shutdown_rtt MODULE_DIR [N]
 *
 * (W3 in docs/benchmarks.md measures one Shutdown per process lifetime; this is the
 * steady-state round trip over many calls.)
 *
 * Prints "RESULT {json}": medians and p99 in microseconds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <rpcplugin/host.h>

#include "bench_util.h"

static int callbacks;

static void on_shutdown(void *ud) {
  (void)ud;
  __atomic_fetch_add(&callbacks, 1, __ATOMIC_RELAXED);
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void measure(grpc_channel *ch, const char *method, int n,
                    double *p50, double *p99) {
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  double *t = malloc(sizeof(double) * (size_t)n);
  int i;
  for (i = 0; i < 100; i++) rpb_unary_empty(ch, cq, method); /* warm up */
  for (i = 0; i < n; i++) {
    double a = now_us();
    if (rpb_unary_empty(ch, cq, method) != GRPC_STATUS_OK) {
      fprintf(stderr, "%s failed\n", method);
      exit(1);
    }
    t[i] = now_us() - a;
  }
  qsort(t, (size_t)n, sizeof *t, cmp);
  *p50 = t[n / 2];
  *p99 = t[(n * 99) / 100];
  free(t);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
             .type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

int main(int argc, char **argv) {
  char dir[] = "/tmp/rpb-sd-XXXXXX", path[256], addr[300];
  const char *search[2];
  rpcplugin_load_options lo;
  rpcplugin_runtime_options o;
  rpcplugin_runtime *rt;
  rpcplugin_manifest *m;
  rpcplugin_module *mod;
  rpcplugin_error err;
  grpc_server *server;
  grpc_server_credentials *sc;
  grpc_channel_credentials *cc;
  grpc_channel *ch;
  double sd50, sd99, h50, h99;
  int n = argc > 2 ? atoi(argv[2]) : 1000;
  FILE *f;

  if (argc < 2 || n < 1 || mkdtemp(dir) == NULL) {
    fprintf(stderr, "usage: rpb_shutdown_rtt MODULE_DIR [N]\n");
    return 2;
  }
  snprintf(path, sizeof path, "%s/m.json", dir);
  f = fopen(path, "w");
  fprintf(f, "{\"manifest_version\": 1, \"name\": \"bench\", \"module\": "
             "\"rpcplugin_services.so\", \"abi_version\": \"1.0\", "
             "\"protocol_version\": 1, \"services\": "
             "[\"plugin.GRPCController\", \"grpc.health.v1.Health\"]}");
  fclose(f);
  grpc_init();
  if (rpcplugin_manifest_load(path, &m, &err)) {
    fprintf(stderr, "%s\n", err.message);
    return 1;
  }
  server = grpc_server_create(NULL, NULL);
  snprintf(addr, sizeof addr, "unix:%s/s.sock", dir);
  sc = grpc_insecure_server_credentials_create();
  grpc_server_add_http2_port(server, addr, sc);
  grpc_server_credentials_release(sc);
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = server;
  o.on_shutdown = on_shutdown;
  search[0] = argv[1];
  search[1] = NULL;
  memset(&lo, 0, sizeof lo);
  lo.struct_size = sizeof lo;
  lo.search_path = search;
  if (rpcplugin_runtime_create(&o, &rt, &err) ||
      rpcplugin_module_load(rt, m, &lo, &mod, &err)) {
    fprintf(stderr, "%s\n", err.message);
    return 1;
  }
  grpc_server_start(server);
  rpcplugin_runtime_start(rt, &err);

  cc = grpc_insecure_credentials_create();
  ch = grpc_channel_create(addr, cc, NULL);
  grpc_channel_credentials_release(cc);
  measure(ch, "/plugin.GRPCController/Shutdown", n, &sd50, &sd99);
  measure(ch, "/grpc.health.v1.Health/Check", n, &h50, &h99);
  grpc_channel_destroy(ch);

  rpcplugin_runtime_destroy(rt);
  grpc_server_destroy(server);
  rpcplugin_manifest_free(m);
  grpc_shutdown_blocking();
  unlink(path);
  snprintf(path, sizeof path, "%s/s.sock", dir);
  unlink(path);
  rmdir(dir);
  printf("RESULT {\"calls\": %d, \"shutdown_p50_us\": %.1f, \"shutdown_p99_us\": "
         "%.1f, \"health_p50_us\": %.1f, \"health_p99_us\": %.1f, "
         "\"shutdown_callbacks\": %d}\n",
         n, sd50, sd99, h50, h99, callbacks);
  return callbacks == 1 ? 0 : 1;
}
