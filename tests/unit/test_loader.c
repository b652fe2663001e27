/*
 * test_loader.c - the loader refuses broken modules before calling them,
 * with exact errors; a newer minor works; routes behave across instances
 * (the basis of a swap); multiplexing's on_ready comes before the
 * connection is read.
 *
 *   test_loader FIXTURE_DIR MODULE_DIR
 */
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <rpcplugin/host.h>

#include "check.h"

#define RP_STR2(x) #x
#define RP_STR(x) RP_STR2(x)

static char tmpdir[] = "/tmp/rp-loader-XXXXXX";
static char marker[512];
static const char *fixtures, *moddir;

static grpc_server *server;
static rpcplugin_runtime *rt;

static void new_runtime(void) {
  rpcplugin_runtime_options o;
  rpcplugin_error err;
  server = grpc_server_create(NULL, NULL);
  memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  o.server = server;
  CHECK_EQ_INT(rpcplugin_runtime_create(&o, &rt, &err), 0);
}

static void end_runtime(void) {
  rpcplugin_runtime_destroy(rt);
  grpc_server_destroy(server);
  rt = NULL;
  server = NULL;
}

/* Write a manifest for `module` with `services` (JSON array text) and
 * `config` (JSON object text or NULL); load it. */
static int load(const char *module, const char *services, const char *config,
                rpcplugin_module **mod, rpcplugin_error *err) {
  char path[600];
  FILE *f;
  rpcplugin_manifest *m = NULL;
  int rc;
  snprintf(path, sizeof path, "%s/m.json", tmpdir);
  f = fopen(path, "w");
  fprintf(f,
          "{\"manifest_version\": 1, \"name\": \"t\", \"module\": \"%s\", "
          "\"abi_version\": \"1.0\", \"protocol_version\": 1, \"services\": "
          "%s%s%s}",
          module, services, config ? ", \"config\": " : "",
          config ? config : "");
  fclose(f);
  rc = rpcplugin_manifest_load(path, &m, err);
  CHECK_EQ_INT(rc, 0);
  if (rc) return rc;
  rc = rpcplugin_module_load(rt, m, NULL, mod, err);
  rpcplugin_manifest_free(m);
  return rc;
}

static int marker_exists(void) { return access(marker, F_OK) == 0; }

static void expect_refused(const char *fixture, int code, const char *what) {
  char module[600];
  rpcplugin_module *mod = NULL;
  rpcplugin_error err;
  snprintf(module, sizeof module, "%s/%s", fixtures, fixture);
  unlink(marker);
  CHECK_EQ_INT(load(module, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err), code);
  CHECK(mod == NULL);
  CHECK_CONTAINS(err.message, what);
  CHECK_CONTAINS(err.message, module);
  CHECK(!marker_exists()); /* no entry past the header was called */
}

static void test_refused(void) {
  new_runtime();
  expect_refused("fake_major2.so", RPCPLUGIN_EABI,
                 "ABI major mismatch (host ABI " RP_STR(RPCPLUGIN_ABI_MAJOR) "." RP_STR(RPCPLUGIN_ABI_MINOR) ", module ABI 2.0)");
  expect_refused("fake_no_entry.so", RPCPLUGIN_ENOSYM,
                 "no entry point rpcplugin_module_entry in");
  expect_refused("fake_bad_magic.so", RPCPLUGIN_EABI, "bad magic");
  expect_refused("fake_bad_tag.so", RPCPLUGIN_EABI,
                 "build mismatch (host \"" RPCPLUGIN_ABI_TAG
                 "\", module \"x86_64-ptr8;grpc-core 0.0.0-other\")");
  expect_refused("fake_small.so", RPCPLUGIN_EABI, "vtable of 96 bytes");
  end_runtime();
}

static void test_files(void) {
  rpcplugin_module *mod = NULL;
  rpcplugin_error err;
  char path[600], module[600];
  int fd, in, n;
  char buf[65536];
  new_runtime();

  /* A bare name nobody has: every folder tried is named. */
  CHECK_EQ_INT(load("nope.so", "[\"plugin.GRPCStdio\"]", NULL, &mod, &err),
               RPCPLUGIN_ENOENT);
  CHECK_CONTAINS(err.message, "field \"module\": \"nope.so\" not found");
  CHECK_CONTAINS(err.message, tmpdir);

  /* Not a shared object. */
  snprintf(path, sizeof path, "%s/text.so", tmpdir);
  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  CHECK(write(fd, "hello\n", 6) == 6);
  close(fd);
  CHECK_EQ_INT(load(path, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err),
               RPCPLUGIN_EDLOPEN);
  CHECK_CONTAINS(err.message, "cannot load module");
  CHECK_CONTAINS(err.message, path);

  /* A copy of the real module that everyone may write: refused. */
  snprintf(module, sizeof module, "%s/rpcplugin_services.so", moddir);
  snprintf(path, sizeof path, "%s/open.so", tmpdir);
  in = open(module, O_RDONLY);
  fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
  while ((n = (int)read(in, buf, sizeof buf)) > 0)
    CHECK(write(fd, buf, (size_t)n) == n);
  close(in);
  close(fd);
  chmod(path, 0777);
  CHECK_EQ_INT(load(path, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err),
               RPCPLUGIN_EREFUSED);
  CHECK_CONTAINS(err.message, "writable by everyone");

  /* The real module refuses a bad config, naming the manifest and field. */
  CHECK_EQ_INT(load(module, "[\"plugin.GRPCStdio\"]",
                    "{\"stdio\": {\"overflow\": 1}}", &mod, &err),
               RPCPLUGIN_ECONFIG);
  CHECK_CONTAINS(err.message, "m.json");
  CHECK_CONTAINS(err.message, "config.stdio.overflow");
  end_runtime();
}

/* The trust rule (sudo's and CrowdSec's for their plugins), checked on the
 * descriptor: a module or manifest writable by group or others, or owned
 * by anyone but root or this user, is refused, naming file, mode or owner,
 * and the rule. */
static void copy_file(const char *from, const char *to, mode_t mode) {
  char buf[65536];
  int in = open(from, O_RDONLY), out, n;
  unlink(to);
  out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CHECK(in >= 0 && out >= 0);
  while ((n = (int)read(in, buf, sizeof buf)) > 0)
    CHECK(write(out, buf, (size_t)n) == n);
  close(in);
  close(out);
  CHECK(chmod(to, mode) == 0);
}

static int load_manifest_file(const char *path, rpcplugin_error *err) {
  rpcplugin_manifest *m = NULL;
  int rc = rpcplugin_manifest_load(path, &m, err);
  rpcplugin_manifest_free(m);
  return rc;
}

static void test_trust(void) {
  rpcplugin_module *mod = NULL;
  rpcplugin_error err;
  char module[600], path[600], man[600];
  FILE *f;
  new_runtime();
  snprintf(module, sizeof module, "%s/rpcplugin_services.so", moddir);
  snprintf(path, sizeof path, "%s/trust.so", tmpdir);

  /* Group-writable module. */
  copy_file(module, path, 0775);
  CHECK_EQ_INT(load(path, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err),
               RPCPLUGIN_EREFUSED);
  CHECK_CONTAINS(err.message, path);
  CHECK_CONTAINS(err.message, "is writable by its group");
  CHECK_CONTAINS(err.message, "mode 0775");
  CHECK_CONTAINS(err.message, "must not be writable by group or others");
  CHECK_CONTAINS(err.message, "m.json"); /* the manifest that named it */

  /* The same file made safe loads. */
  CHECK(chmod(path, 0755) == 0);
  CHECK_EQ_INT(load(path, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err), 0);
  if (mod) CHECK_EQ_INT(rpcplugin_module_unload(mod), 0);
  mod = NULL;

  /* A manifest writable by everyone, then by its group. */
  snprintf(man, sizeof man, "%s/open.json", tmpdir);
  f = fopen(man, "w");
  fprintf(f, "{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
             "\"%s\", \"abi_version\": \"1.0\", \"protocol_version\": 1, "
             "\"services\": [\"plugin.GRPCStdio\"]}", path);
  fclose(f);
  CHECK(chmod(man, 0666) == 0);
  CHECK_EQ_INT(load_manifest_file(man, &err), RPCPLUGIN_EREFUSED);
  CHECK_CONTAINS(err.message, "manifest");
  CHECK_CONTAINS(err.message, man);
  CHECK_CONTAINS(err.message, "writable by everyone (mode 0666)");
  CHECK(chmod(man, 0620) == 0);
  CHECK_EQ_INT(load_manifest_file(man, &err), RPCPLUGIN_EREFUSED);
  CHECK_CONTAINS(err.message, "writable by its group");
  CHECK(chmod(man, 0644) == 0);
  CHECK_EQ_INT(load_manifest_file(man, &err), 0);

  /* Owned by another user (needs root to give it away). */
  if (geteuid() == 0) {
    CHECK(chown(path, 65534, 65534) == 0);
    CHECK_EQ_INT(load(path, "[\"plugin.GRPCStdio\"]", NULL, &mod, &err),
                 RPCPLUGIN_EREFUSED);
    CHECK_CONTAINS(err.message, "is owned by");
    CHECK_CONTAINS(err.message, "uid 65534");
    CHECK_CONTAINS(err.message, "must be owned by root or by the user the "
                                "host runs as, root (uid 0)");
    CHECK(chown(man, 65534, 65534) == 0);
    CHECK_EQ_INT(load_manifest_file(man, &err), RPCPLUGIN_EREFUSED);
    CHECK_CONTAINS(err.message, "uid 65534");
  } else {
    fprintf(stderr, "test_trust: not root, ownership not tested\n");
  }
  end_runtime();
}

static void test_newer_minor(void) {
  rpcplugin_module *mod = NULL;
  rpcplugin_error err;
  char module[600];
  const rpcplugin_module_api *api;
  rpcplugin_stats st;
  new_runtime();
  snprintf(module, sizeof module, "%s/rpcplugin_services_newer.so", fixtures);
  CHECK_EQ_INT(load(module, "[\"plugin.GRPCStdio\", \"grpc.health.v1.Health\"]",
                    NULL, &mod, &err),
               0);
  if (mod == NULL) {
    fprintf(stderr, "%s\n", err.message);
    end_runtime();
    return;
  }
  api = rpcplugin_module_api_of(mod);
  CHECK_EQ_INT(api->abi_minor, RPCPLUGIN_ABI_MINOR + 1);
  CHECK(api->struct_size > sizeof(rpcplugin_module_api));
  CHECK_EQ_INT(rpcplugin_module_put_line(mod, RPCPLUGIN_STDOUT, "x\n", 2), 0);
  memset(&st, 0, sizeof st);
  st.struct_size = sizeof st;
  CHECK_EQ_INT(rpcplugin_module_get_stats(mod, &st), 0);
  CHECK_EQ_INT(st.stdio_queued_chunks, 1);
  CHECK_EQ_INT(rpcplugin_module_unload(mod), 0);
  end_runtime();
}

/* Routes: a second instance cannot take a method the first serves; a
 * method that was never registered cannot be added after start; after
 * the first instance is unloaded a new one takes its methods on the live
 * server (the mechanics a swap is made of). */
static void test_routes(void) {
  rpcplugin_module *a = NULL, *b = NULL;
  rpcplugin_error err;
  char module[600];
  grpc_server_credentials *creds;
  char addr[600];
  new_runtime();
  snprintf(module, sizeof module, "%s/rpcplugin_services.so", moddir);
  snprintf(addr, sizeof addr, "unix:%s/s.sock", tmpdir);
  creds = grpc_insecure_server_credentials_create();
  CHECK(grpc_server_add_http2_port(server, addr, creds) > 0);
  grpc_server_credentials_release(creds);
  CHECK_EQ_INT(load(module, "[\"grpc.health.v1.Health\"]", NULL, &a, &err), 0);
  CHECK_EQ_INT(load(module, "[\"grpc.health.v1.Health\"]", NULL, &b, &err),
               RPCPLUGIN_EEXIST);
  CHECK_CONTAINS(err.message, "/grpc.health.v1.Health/Check is already served");
  /* A refusal after the services were created: they are stopped and freed
   * (the sanitizer builds check that nothing leaks). */
  CHECK_EQ_INT(load(module,
                    "[\"plugin.GRPCStdio\", \"plugin.GRPCBroker\", "
                    "\"grpc.health.v1.Health\"]",
                    NULL, &b, &err),
               RPCPLUGIN_EEXIST);
  CHECK(b == NULL);
  grpc_server_start(server);
  CHECK_EQ_INT(rpcplugin_runtime_start(rt, &err), 0);
  /* Never registered before the start: cannot be added now. */
  CHECK_EQ_INT(load(module, "[\"plugin.GRPCController\"]", NULL, &b, &err),
               RPCPLUGIN_ESTATE);
  CHECK_CONTAINS(err.message, "the server already started");
  /* Registered before the start by the refused instance above: a new
   * instance binds it on the live server. */
  CHECK_EQ_INT(load(module, "[\"plugin.GRPCStdio\"]", NULL, &b, &err), 0);
  CHECK(b != NULL);
  if (b) CHECK_EQ_INT(rpcplugin_module_unload(b), 0);
  b = NULL;
  CHECK_EQ_INT(rpcplugin_module_unload(a), 0);
  CHECK_EQ_INT(load(module, "[\"grpc.health.v1.Health\"]", NULL, &b, &err), 0);
  CHECK(b != NULL);
  end_runtime(); /* unloads b */
}

/* Multiplexing's on_ready: called once inside rpcplugin_runtime_multiplex,
 * with the runtime multiplexing (routes and advertisements work) and
 * before a byte of the connection is read; a caller's older, shorter
 * struct (without on_ready) is accepted.  A yamux ping written before the
 * call is answered only after it. */
struct ready_probe {
  int fd;       /* the runtime's end of the connection */
  int calls;
  int multiplexed;
  int route_rc, advertise_rc;
  int unread_at_start, unread_after_wait; /* FIONREAD */
  rpcplugin_module *mod;
};

static void probe_ready(void *ud) {
  struct ready_probe *p = ud;
  struct pollfd pfd;
  p->calls++;
  p->multiplexed = rpcplugin_runtime_multiplexed(rt);
  if (ioctl(p->fd, FIONREAD, &p->unread_at_start) != 0)
    p->unread_at_start = -1;
  p->route_rc = rpcplugin_runtime_mux_route(rt, 7, "unix", "/nonexistent");
  p->advertise_rc =
      rpcplugin_module_broker_advertise(p->mod, 8, "unix", "/nonexistent");
  /* Were the I/O thread running, it would take the ping within this. */
  pfd.fd = -1;
  pfd.events = 0;
  (void)poll(&pfd, 0, 100);
  if (ioctl(p->fd, FIONREAD, &p->unread_after_wait) != 0)
    p->unread_after_wait = -1;
}

static void test_mux_ready(void) {
  static const unsigned char ping[12] = {0, 2, 0, 1, 0, 0, 0, 0,
                                         0x12, 0x34, 0x56, 0x78};
  rpcplugin_module *mod = NULL;
  rpcplugin_error err;
  rpcplugin_mux_options o;
  struct ready_probe p;
  char module[600], addr[700], main_path[600], dial_dir[600];
  unsigned char ack[12];
  size_t got = 0;
  grpc_server_credentials *creds;
  int sv[2], round;
  for (round = 0; round < 2; round++) {
    new_runtime();
    snprintf(module, sizeof module, "%s/rpcplugin_services.so", moddir);
    snprintf(main_path, sizeof main_path, "%s/main%d.sock", tmpdir, round);
    snprintf(dial_dir, sizeof dial_dir, "%s/d%d", tmpdir, round);
    CHECK_EQ_INT(mkdir(dial_dir, 0700), 0);
    snprintf(addr, sizeof addr, "unix:%s", main_path);
    creds = grpc_insecure_server_credentials_create();
    CHECK(grpc_server_add_http2_port(server, addr, creds) > 0);
    grpc_server_credentials_release(creds);
    CHECK_EQ_INT(load(module, "[\"plugin.GRPCBroker\"]", NULL, &mod, &err),
                 0);
    grpc_server_start(server);
    CHECK_EQ_INT(rpcplugin_runtime_start(rt, &err), 0);
    CHECK_EQ_INT(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    CHECK_EQ_INT(write(sv[1], ping, sizeof ping), (long)sizeof ping);
    memset(&p, 0, sizeof p);
    p.fd = sv[0];
    p.mod = mod;
    memset(&o, 0, sizeof o);
    /* Round 1: a caller built before on_ready existed. */
    o.struct_size = round == 0 ? (uint32_t)sizeof o
                               : (uint32_t)offsetof(rpcplugin_mux_options,
                                                    on_ready);
    o.fd = sv[0];
    o.main_path = main_path;
    o.dial_dir = dial_dir;
    o.keepalive_ms = -1;
    o.on_ready = probe_ready; /* beyond struct_size in round 1 */
    o.ud = &p;
    CHECK_EQ_INT(rpcplugin_runtime_multiplex(rt, &o, &err), 0);
    if (round == 0) {
      CHECK_EQ_INT(p.calls, 1);
      CHECK_EQ_INT(p.multiplexed, 1);
      CHECK_EQ_INT(p.route_rc, 0);
      CHECK_EQ_INT(p.advertise_rc, 0);
      CHECK_EQ_INT(p.unread_at_start, (int)sizeof ping);
      CHECK_EQ_INT(p.unread_after_wait, (int)sizeof ping);
    } else {
      CHECK_EQ_INT(p.calls, 0);
    }
    /* Now the session runs: the ping is answered (ACK, same opaque). */
    got = 0;
    while (got < sizeof ack) {
      struct pollfd pfd = {sv[1], POLLIN, 0};
      ssize_t n;
      if (poll(&pfd, 1, 5000) != 1) break;
      n = read(sv[1], ack + got, sizeof ack - got);
      if (n <= 0) break;
      got += (size_t)n;
    }
    CHECK_EQ_INT(got, sizeof ack);
    CHECK(got == sizeof ack && ack[1] == 2 && ack[3] == 2 &&
          memcmp(ack + 8, ping + 8, 4) == 0);
    end_runtime(); /* stops the session, unloads mod */
    close(sv[1]);
    rmdir(dial_dir);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: test_loader FIXTURE_DIR MODULE_DIR\n");
    return 2;
  }
  fixtures = argv[1];
  moddir = argv[2];
  if (mkdtemp(tmpdir) == NULL) return 2;
  snprintf(marker, sizeof marker, "%s/called", tmpdir);
  setenv("RP_FAKE_MARKER", marker, 1);
  grpc_init();
  test_refused();
  test_files();
  test_trust();
  test_newer_minor();
  test_routes();
  test_mux_ready();
  grpc_shutdown_blocking();
  {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmpdir);
  }
  return check_report("test_loader");
}
