/*
 * kv.c - go-plugin's KV example (examples/grpc) as an rpcplugin
 * application module: service proto.KV, Put writes the value to the file
 * kv_<key> in the working directory, Get reads it back.  Served by
 *
 *   rpcplugin-host --magic-cookie BASIC_PLUGIN=hello kv.json
 *
 * which is then a complete go-plugin plugin: the infrastructure services
 * (health, stdio, broker, controller) come from the manifest named by
 * kv.json's "infrastructure".  Messages are encoded with protobuf-c
 * (kv.pb-c.c, generated from kv.proto at build time).
 *
 * Handlers run on the host's poller threads and must not block for long.
 * A Put or Get is one open/write (or read)/close of a small file of the
 * working directory, quick enough to do right in the handler, as the Go
 * plugin does in its handler's goroutine; a handler that waits longer
 * (the network, a lock) hands the call to a thread of its own and answers
 * from there (examples/bidirectional does).
 */
#include <errno.h>
#include <stdatomic.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rpcplugin/rpcplugin.h>

#include "kv.pb-c.h"

/* The .proto's descriptor set, made at build time (examples/CMakeLists.txt):
 * given to the host for server reflection. */
extern const unsigned char kv_descriptor_set[];
extern const size_t kv_descriptor_set_len;

#define SUFFIX "\n\nWritten from plugin-c (rpcplugin)"

enum { OP_GET, OP_PUT };

typedef struct kv {
  rpcplugin_host_api host;
} kv;

/* ------------------------------------------------------- the store */

/* A key names a file of the working directory, nothing else. */
static int key_ok(const char *key) {
  return key[0] != '\0' && strchr(key, '/') == NULL && strcmp(key, ".") &&
         strcmp(key, "..");
}

static void reply(rpcplugin_call *call, const ProtobufCMessage *msg) {
  size_t n = protobuf_c_message_get_packed_size(msg);
  uint8_t *buf = malloc(n ? n : 1);
  if (buf == NULL) {
    rpcplugin_call_finish(call, 8 /* RESOURCE_EXHAUSTED */, "out of memory");
    return;
  }
  protobuf_c_message_pack(msg, buf);
  rpcplugin_call_send(call, buf, n);
  free(buf);
  rpcplugin_call_finish(call, 0, NULL);
}

/* Two implementations from this file: kv.so writes the file in place (as
 * go-plugin's example does); kv-atomic.so (built with KV_ATOMIC_WRITES)
 * writes a temporary file and renames it over the old one, so that a
 * reader never sees half a value.  Both read and write the same files: a
 * live swap between them keeps every value. */
#ifdef KV_ATOMIC_WRITES
#define KV_IMPL "kv-atomic"
#else
#define KV_IMPL "kv"
#endif

static void do_put(rpcplugin_call *call, const Proto__PutRequest *req) {
  char path[4096], tmp[4200], msg[4300];
  FILE *f;
  Proto__Empty empty = PROTO__EMPTY__INIT;
  static atomic_uint seq;
  snprintf(path, sizeof path, "kv_%s", req->key);
#ifdef KV_ATOMIC_WRITES
  snprintf(tmp, sizeof tmp, ".%s.%ld.%u.tmp", path, (long)getpid(),
           atomic_fetch_add(&seq, 1));
#else
  (void)seq;
  snprintf(tmp, sizeof tmp, "%s", path);
#endif
  f = fopen(tmp, "wb");
  if (f != NULL) {
    int bad = fwrite(req->value.data, 1, req->value.len, f) !=
                  req->value.len ||
              fputs(SUFFIX, f) == EOF;
    int e = errno;
    if (fclose(f) != 0 || bad) {
      if (bad) errno = e;
      f = NULL;
    }
  }
  if (f == NULL || (strcmp(tmp, path) != 0 && rename(tmp, path) != 0)) {
    snprintf(msg, sizeof msg, "open %s: %s", path, strerror(errno));
    if (strcmp(tmp, path) != 0) unlink(tmp);
    rpcplugin_call_finish(call, 2 /* UNKNOWN, as the Go plugin's error */,
                          msg);
    return;
  }
  reply(call, &empty.base);
}

static void do_get(rpcplugin_call *call, const Proto__GetRequest *req) {
  char path[4096], msg[4200];
  Proto__GetResponse resp = PROTO__GET_RESPONSE__INIT;
  uint8_t *data = NULL;
  size_t len = 0, cap = 0;
  FILE *f;
  snprintf(path, sizeof path, "kv_%s", req->key);
  if ((f = fopen(path, "rb")) == NULL) {
    snprintf(msg, sizeof msg, "open %s: %s", path, strerror(errno));
    rpcplugin_call_finish(call, 2, msg);
    return;
  }
  for (;;) {
    size_t n;
    if (len == cap) {
      uint8_t *more = realloc(data, cap = cap ? 2 * cap : 4096);
      if (more == NULL) break;
      data = more;
    }
    n = fread(data + len, 1, cap - len, f);
    len += n;
    if (n == 0) break;
  }
  fclose(f);
  resp.value.data = data;
  resp.value.len = len;
  reply(call, &resp.base);
  free(data);
}

/* --------------------------------------------------------- handlers */

/* Decode the request, check the key, answer. */
static void handle(int op, const ProtobufCMessageDescriptor *desc,
                   rpcplugin_call *call) {
  size_t len;
  const uint8_t *data = rpcplugin_call_request(call, &len);
  ProtobufCMessage *req = protobuf_c_message_unpack(desc, NULL, len, data);
  const char *key;
  if (req == NULL) {
    rpcplugin_call_finish(call, 3 /* INVALID_ARGUMENT */, "bad request");
    return;
  }
  key = op == OP_PUT ? ((Proto__PutRequest *)req)->key
                     : ((Proto__GetRequest *)req)->key;
  if (!key_ok(key))
    rpcplugin_call_finish(call, 3, "a key names a file: no '/', not empty");
  else if (op == OP_PUT)
    do_put(call, (const Proto__PutRequest *)req);
  else
    do_get(call, (const Proto__GetRequest *)req);
  protobuf_c_message_free_unpacked(req, NULL);
}

static void on_get(void *ctx, rpcplugin_call *call) {
  (void)ctx;
  handle(OP_GET, &proto__get_request__descriptor, call);
}

static void on_put(void *ctx, rpcplugin_call *call) {
  (void)ctx;
  handle(OP_PUT, &proto__put_request__descriptor, call);
}

/* ----------------------------------------------------------- module */

static int kv_init(const rpcplugin_host_api *host, const char *config_json,
                   void **out, char *err, size_t errlen) {
  kv *k;
  (void)config_json; /* no settings */
  if (!RPCPLUGIN_HOST_HAS(host, add_call_method)) {
    snprintf(err, errlen, "this host has no application calls (ABI 1.1)");
    return RPCPLUGIN_EUNSUPPORTED;
  }
  if ((k = calloc(1, sizeof *k)) == NULL) return RPCPLUGIN_ENOMEM;
  memcpy(&k->host, host,
         host->struct_size < sizeof k->host ? host->struct_size
                                            : sizeof k->host);
  *out = k;
  return 0;
}

static int kv_register(void *inst, const char *const *services, size_t n,
                       char *err, size_t errlen) {
  kv *k = inst;
  int rc;
  if (n != 1 || strcmp(services[0], "proto.KV") != 0) {
    snprintf(err, errlen, "this module serves \"proto.KV\" only");
    return RPCPLUGIN_EINVAL;
  }
  rc = k->host.add_call_method(k->host.host_ctx, "/proto.KV/Get",
                               RPCPLUGIN_UNARY, on_get, k, err, errlen);
  if (rc == 0)
    rc = k->host.add_call_method(k->host.host_ctx, "/proto.KV/Put",
                                 RPCPLUGIN_UNARY, on_put, k, err, errlen);
  if (rc == 0 && RPCPLUGIN_HOST_HAS(&k->host, add_descriptors))
    rc = k->host.add_descriptors(k->host.host_ctx, kv_descriptor_set,
                                 kv_descriptor_set_len, err, errlen);
  return rc;
}

static int kv_start(void *inst) {
  (void)inst;
  return 0;
}

static int kv_shutdown(void *inst) {
  (void)inst; /* every call is answered in its handler */
  return 0;
}

static void kv_destroy(void *inst) { free(inst); }

static int kv_put_line(void *inst, int ch, const void *data, size_t len) {
  (void)inst, (void)ch, (void)data, (void)len;
  return RPCPLUGIN_EUNSUPPORTED; /* the infrastructure module's job */
}

static int kv_get_stats(void *inst, rpcplugin_stats *out) {
  (void)inst, (void)out;
  return RPCPLUGIN_EUNSUPPORTED;
}

static const rpcplugin_module_api kv_api = {
    .magic = RPCPLUGIN_MODULE_MAGIC,
    .abi_major = RPCPLUGIN_ABI_MAJOR,
    .abi_minor = RPCPLUGIN_ABI_MINOR,
    .struct_size = sizeof(rpcplugin_module_api),
    .abi_tag = RPCPLUGIN_ABI_TAG,
    .name = KV_IMPL,
    .version = "1.0",
    .init = kv_init,
    .register_services = kv_register,
    .start = kv_start,
    .put_line = kv_put_line,
    .shutdown = kv_shutdown,
    .destroy = kv_destroy,
    .get_stats = kv_get_stats,
};

__attribute__((visibility("default"))) const rpcplugin_module_api *
rpcplugin_module_entry(void) {
  return &kv_api;
}
