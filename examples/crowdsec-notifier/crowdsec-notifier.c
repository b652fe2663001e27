/*
 * crowdsec-notifier.c - a CrowdSec notification plugin in C, as an
 * rpcplugin application module: service proto.Notifier.
 *
 *   Configure(Config{config: the notification's YAML})
 *       remembers the file that the YAML's "output_file:" names, for the
 *       notification that its "name:" names (CrowdSec sends one Configure
 *       per notification of this plugin's type);
 *   Notify(Notification{text, name})
 *       appends text and a newline to that notification's file.
 *
 * CrowdSec runs the plugin file itself, with no arguments, as nobody, and
 * a fresh random CROWDSEC_PLUGIN_KEY each time: the plugin file is a
 * script that runs
 *
 *   rpcplugin-host --magic-cookie CROWDSEC_PLUGIN_KEY crowdsec-notifier.json
 *
 * (KEY alone: any non-empty value).  The YAML is read line by line: CrowdSec
 * re-marshals it with yaml.v2, so top-level keys come one per line,
 * unquoted for plain values.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <rpcplugin/rpcplugin.h>

#include "notifier.pb-c.h"

/* The .proto's descriptor set, made at build time (examples/CMakeLists.txt):
 * given to the host for server reflection. */
extern const unsigned char notifier_descriptor_set[];
extern const size_t notifier_descriptor_set_len;

#define MAX_TARGETS 32

typedef struct target {
  char name[128];
  char path[1024];
} target;

typedef struct notifier {
  rpcplugin_host_api host;
  pthread_mutex_t mu;
  target targets[MAX_TARGETS];
  size_t ntargets;
} notifier;

/* The value of top-level "key:" in yaml, into out (trimmed, unquoted). */
static int yaml_value(const char *yaml, size_t len, const char *key,
                      char *out, size_t outlen) {
  size_t klen = strlen(key), i = 0;
  while (i < len) {
    size_t end = i;
    while (end < len && yaml[end] != '\n') end++;
    if (end - i > klen && memcmp(yaml + i, key, klen) == 0 &&
        yaml[i + klen] == ':') {
      size_t a = i + klen + 1, b = end;
      while (a < b && (yaml[a] == ' ' || yaml[a] == '\t')) a++;
      while (b > a && (yaml[b - 1] == ' ' || yaml[b - 1] == '\r')) b--;
      if (b - a >= 2 && (yaml[a] == '"' || yaml[a] == '\'') &&
          yaml[b - 1] == yaml[a]) {
        a++;
        b--;
      }
      if (b - a == 0 || b - a >= outlen) return -1;
      memcpy(out, yaml + a, b - a);
      out[b - a] = '\0';
      return 0;
    }
    i = end + 1;
  }
  return -1;
}

static void empty_reply(rpcplugin_call *call) {
  /* proto.Empty encodes to no bytes at all. */
  rpcplugin_call_send(call, "", 0);
  rpcplugin_call_finish(call, 0, NULL);
}

static void on_configure(void *ctx, rpcplugin_call *call) {
  notifier *n = ctx;
  size_t len, i;
  const uint8_t *data = rpcplugin_call_request(call, &len);
  Proto__Config *cfg = proto__config__unpack(NULL, len, data);
  target t;
  if (cfg == NULL) {
    rpcplugin_call_finish(call, 3 /* INVALID_ARGUMENT */, "bad Config");
    return;
  }
  if (yaml_value((const char *)cfg->config.data, cfg->config.len, "name",
                 t.name, sizeof t.name) != 0 ||
      yaml_value((const char *)cfg->config.data, cfg->config.len,
                 "output_file", t.path, sizeof t.path) != 0 ||
      t.path[0] != '/') {
    proto__config__free_unpacked(cfg, NULL);
    rpcplugin_call_finish(call, 3,
                          "the notification config needs \"name:\" and an "
                          "absolute \"output_file:\"");
    return;
  }
  proto__config__free_unpacked(cfg, NULL);
  pthread_mutex_lock(&n->mu);
  for (i = 0; i < n->ntargets && strcmp(n->targets[i].name, t.name); i++) {
  }
  if (i < MAX_TARGETS) {
    n->targets[i] = t;
    if (i == n->ntargets) n->ntargets++;
  }
  pthread_mutex_unlock(&n->mu);
  if (i == MAX_TARGETS) {
    rpcplugin_call_finish(call, 8 /* RESOURCE_EXHAUSTED */,
                          "too many notifications");
    return;
  }
  empty_reply(call);
}

/* One write(2) with O_APPEND: a short line to a local file, quick enough
 * for a handler (which must not block for long), and whole even when
 * several notifications write at once. */
static void on_notify(void *ctx, rpcplugin_call *call) {
  notifier *n = ctx;
  size_t len, i;
  const uint8_t *data = rpcplugin_call_request(call, &len);
  Proto__Notification *note = proto__notification__unpack(NULL, len, data);
  char path[1024] = "", msg[1200];
  char *line;
  int fd;
  if (note == NULL) {
    rpcplugin_call_finish(call, 3, "bad Notification");
    return;
  }
  pthread_mutex_lock(&n->mu);
  for (i = 0; i < n->ntargets; i++)
    if (strcmp(n->targets[i].name, note->name) == 0)
      snprintf(path, sizeof path, "%s", n->targets[i].path);
  pthread_mutex_unlock(&n->mu);
  if (path[0] == '\0') {
    snprintf(msg, sizeof msg, "notification \"%.100s\" was not configured",
             note->name);
    proto__notification__free_unpacked(note, NULL);
    rpcplugin_call_finish(call, 9 /* FAILED_PRECONDITION */, msg);
    return;
  }
  len = strlen(note->text);
  line = malloc(len + 1);
  fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (line) {
    memcpy(line, note->text, len);
    line[len] = '\n';
  }
  if (line == NULL || fd < 0 || write(fd, line, len + 1) != (ssize_t)len + 1) {
    snprintf(msg, sizeof msg, "%s: %s", path, strerror(errno));
    rpcplugin_call_finish(call, 13 /* INTERNAL */, msg);
  } else {
    empty_reply(call);
  }
  if (fd >= 0) close(fd);
  free(line);
  proto__notification__free_unpacked(note, NULL);
}

/* ----------------------------------------------------------- module */

static int n_init(const rpcplugin_host_api *host, const char *config_json,
                  void **out, char *err, size_t errlen) {
  notifier *n;
  (void)config_json;
  if (!RPCPLUGIN_HOST_HAS(host, add_call_method)) {
    snprintf(err, errlen, "this host has no application calls (ABI 1.1)");
    return RPCPLUGIN_EUNSUPPORTED;
  }
  if ((n = calloc(1, sizeof *n)) == NULL) return RPCPLUGIN_ENOMEM;
  memcpy(&n->host, host,
         host->struct_size < sizeof n->host ? host->struct_size
                                            : sizeof n->host);
  pthread_mutex_init(&n->mu, NULL);
  *out = n;
  return 0;
}

static int n_register(void *inst, const char *const *services, size_t count,
                      char *err, size_t errlen) {
  notifier *n = inst;
  int rc;
  if (count != 1 || strcmp(services[0], "proto.Notifier") != 0) {
    snprintf(err, errlen, "this module serves \"proto.Notifier\" only");
    return RPCPLUGIN_EINVAL;
  }
  rc = n->host.add_call_method(n->host.host_ctx, "/proto.Notifier/Notify",
                               RPCPLUGIN_UNARY, on_notify, n, err, errlen);
  if (rc == 0)
    rc = n->host.add_call_method(n->host.host_ctx,
                                 "/proto.Notifier/Configure", RPCPLUGIN_UNARY,
                                 on_configure, n, err, errlen);
  if (rc == 0 && RPCPLUGIN_HOST_HAS(&n->host, add_descriptors))
    rc = n->host.add_descriptors(n->host.host_ctx, notifier_descriptor_set,
                                 notifier_descriptor_set_len, err, errlen);
  return rc;
}

static int n_start(void *inst) {
  (void)inst;
  return 0;
}

static int n_shutdown(void *inst) {
  (void)inst; /* every call is answered in its handler */
  return 0;
}

static void n_destroy(void *inst) {
  notifier *n = inst;
  pthread_mutex_destroy(&n->mu);
  free(n);
}

static int n_put_line(void *inst, int ch, const void *data, size_t len) {
  (void)inst, (void)ch, (void)data, (void)len;
  return RPCPLUGIN_EUNSUPPORTED;
}

static int n_get_stats(void *inst, rpcplugin_stats *out) {
  (void)inst, (void)out;
  return RPCPLUGIN_EUNSUPPORTED;
}

static const rpcplugin_module_api notifier_api = {
    .magic = RPCPLUGIN_MODULE_MAGIC,
    .abi_major = RPCPLUGIN_ABI_MAJOR,
    .abi_minor = RPCPLUGIN_ABI_MINOR,
    .struct_size = sizeof(rpcplugin_module_api),
    .abi_tag = RPCPLUGIN_ABI_TAG,
    .name = "crowdsec-notifier",
    .version = "1.0",
    .init = n_init,
    .register_services = n_register,
    .start = n_start,
    .put_line = n_put_line,
    .shutdown = n_shutdown,
    .destroy = n_destroy,
    .get_stats = n_get_stats,
};

__attribute__((visibility("default"))) const rpcplugin_module_api *
rpcplugin_module_entry(void) {
  return &notifier_api;
}
