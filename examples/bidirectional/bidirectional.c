/*
 * bidirectional.c - go-plugin's bidirectional example (Counter) as an
 * rpcplugin application module.  The client serves AddHelper through
 * go-plugin's broker and names its broker id in each Put; the plugin dials
 * that id (broker_dial: go-plugin's GRPCBroker.Dial), calls
 * AddHelper.Sum(stored, value) and stores the result in kv_<key> as
 * {"Value":N}, as the example's Go plugin does.  Get reads it back.
 *
 *   rpcplugin-host --magic-cookie BASIC_PLUGIN=hello bidirectional.json
 *
 * With AutoMTLS the dial uses TLS, with the plugin's certificate, trusting
 * only the client's.  The waiting (the dial, the call back, the file) is
 * done on a worker thread, never on the handler's poller thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rpcplugin/rpcplugin.h>

#include "counter.pb-c.h"
#include "worker.h"

/* The .proto's descriptor set, made at build time (examples/CMakeLists.txt):
 * given to the host for server reflection. */
extern const unsigned char counter_descriptor_set[];
extern const size_t counter_descriptor_set_len;

#define DIAL_TIMEOUT_MS 5000 /* go-plugin's Dial waits 5 s for the id */
#define CALL_TIMEOUT_MS 10000

typedef struct counter {
  rpcplugin_host_api host;
  ex_worker worker;
} counter;

typedef struct job {
  ex_job base; /* first */
  counter *c;
  rpcplugin_call *call;
  int is_put;
  ProtobufCMessage *req;
} job;

/* ------------------------------------------------------- the store */

static int key_ok(const char *key) {
  return key[0] != '\0' && strchr(key, '/') == NULL && strcmp(key, ".") &&
         strcmp(key, "..");
}

/* kv_<key> holds {"Value":N}.  0 when read, else -errno. */
static int load(const char *key, int64_t *value) {
  char path[4096], buf[128];
  const char *v;
  size_t n;
  FILE *f;
  snprintf(path, sizeof path, "kv_%s", key);
  if ((f = fopen(path, "r")) == NULL) return -errno;
  n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  v = strstr(buf, "\"Value\":");
  if (v == NULL) return -EINVAL;
  *value = strtoll(v + 8, NULL, 10);
  return 0;
}

static int store(const char *key, int64_t value) {
  char path[4096];
  FILE *f;
  int ok;
  snprintf(path, sizeof path, "kv_%s", key);
  if ((f = fopen(path, "w")) == NULL) return -errno;
  ok = fprintf(f, "{\"Value\":%" PRId64 "}", value) > 0;
  return fclose(f) == 0 && ok ? 0 : -EIO;
}

static void reply(rpcplugin_call *call, const ProtobufCMessage *msg) {
  uint8_t buf[64]; /* the replies here are a few bytes */
  size_t n = protobuf_c_message_pack(msg, buf);
  rpcplugin_call_send(call, buf, n);
  rpcplugin_call_finish(call, 0, NULL);
}

/* ------------------------------------------------------ the methods */

static void do_get(rpcplugin_call *call, const Proto__GetRequest *req) {
  Proto__GetResponse resp = PROTO__GET_RESPONSE__INIT;
  char msg[4200];
  int rc = load(req->key, &resp.value);
  if (rc != 0) {
    snprintf(msg, sizeof msg, "open kv_%s: %s", req->key, strerror(-rc));
    rpcplugin_call_finish(call, 2 /* UNKNOWN, as the Go plugin's error */,
                          msg);
    return;
  }
  reply(call, &resp.base);
}

static void do_put(counter *c, rpcplugin_call *call,
                   const Proto__PutRequest *req) {
  Proto__SumRequest sum = PROTO__SUM_REQUEST__INIT;
  Proto__SumResponse *res;
  Proto__Empty empty = PROTO__EMPTY__INIT;
  grpc_channel *ch = NULL;
  uint8_t out[64], in[64];
  size_t n, got = 0;
  char err[512];
  int rc;

  if (rpcplugin_call_cancelled(call)) { /* the client left, or shutdown */
    rpcplugin_call_finish(call, 1 /* CANCELLED */, NULL);
    return;
  }
  sum.a = 0; /* a key not stored yet counts as 0, as in the example */
  load(req->key, &sum.a);
  sum.b = req->value;
  /* go-plugin's Dial: the client advertised its AddHelper server under
   * add_server on the broker stream. */
  rc = c->host.broker_dial(c->host.host_ctx, req->add_server, DIAL_TIMEOUT_MS,
                           &ch, err, sizeof err);
  if (rc == 0) {
    n = protobuf_c_message_pack(&sum.base, out);
    rc = c->host.unary_call(c->host.host_ctx, ch, "/proto.AddHelper/Sum",
                            out, n, CALL_TIMEOUT_MS, in, sizeof in, &got, err,
                            sizeof err);
    c->host.broker_release(c->host.host_ctx, ch);
  }
  if (rc != 0) {
    rpcplugin_call_finish(call, 14 /* UNAVAILABLE */, err);
    return;
  }
  if ((res = proto__sum_response__unpack(NULL, got, in)) == NULL) {
    rpcplugin_call_finish(call, 13 /* INTERNAL */, "bad SumResponse");
    return;
  }
  rc = store(req->key, res->r);
  proto__sum_response__free_unpacked(res, NULL);
  if (rc != 0) {
    snprintf(err, sizeof err, "write kv_%s: %s", req->key, strerror(-rc));
    rpcplugin_call_finish(call, 2, err);
    return;
  }
  reply(call, &empty.base);
}

/* On the worker thread. */
static void run(ex_job *base) {
  job *j = (job *)base;
  if (j->is_put)
    do_put(j->c, j->call, (const Proto__PutRequest *)j->req);
  else
    do_get(j->call, (const Proto__GetRequest *)j->req);
  protobuf_c_message_free_unpacked(j->req, NULL);
  free(j);
}

static void enqueue(counter *c, int is_put,
                    const ProtobufCMessageDescriptor *desc,
                    rpcplugin_call *call) {
  size_t len;
  const uint8_t *data = rpcplugin_call_request(call, &len);
  ProtobufCMessage *req = protobuf_c_message_unpack(desc, NULL, len, data);
  job *j;
  if (req == NULL) {
    rpcplugin_call_finish(call, 3 /* INVALID_ARGUMENT */, "bad request");
    return;
  }
  if (!key_ok(is_put ? ((Proto__PutRequest *)req)->key
                     : ((Proto__GetRequest *)req)->key)) {
    protobuf_c_message_free_unpacked(req, NULL);
    rpcplugin_call_finish(call, 3, "a key names a file: no '/', not empty");
    return;
  }
  if ((j = calloc(1, sizeof *j)) == NULL) {
    protobuf_c_message_free_unpacked(req, NULL);
    rpcplugin_call_finish(call, 8, "out of memory");
    return;
  }
  j->base.run = run;
  j->c = c;
  j->call = call;
  j->is_put = is_put;
  j->req = req;
  ex_worker_submit(&c->worker, &j->base);
}

static void on_get(void *ctx, rpcplugin_call *call) {
  enqueue(ctx, 0, &proto__get_request__descriptor, call);
}

static void on_put(void *ctx, rpcplugin_call *call) {
  enqueue(ctx, 1, &proto__put_request__descriptor, call);
}

/* ----------------------------------------------------------- module */

static int c_init(const rpcplugin_host_api *host, const char *config_json,
                  void **out, char *err, size_t errlen) {
  counter *c;
  (void)config_json;
  if (!RPCPLUGIN_HOST_HAS(host, unary_call) ||
      !RPCPLUGIN_HOST_HAS(host, broker_dial)) {
    snprintf(err, errlen, "this host has no broker_dial/unary_call (ABI 1.1)");
    return RPCPLUGIN_EUNSUPPORTED;
  }
  if ((c = calloc(1, sizeof *c)) == NULL) return RPCPLUGIN_ENOMEM;
  memcpy(&c->host, host,
         host->struct_size < sizeof c->host ? host->struct_size
                                            : sizeof c->host);
  if (ex_worker_start(&c->worker) != 0) {
    free(c);
    return RPCPLUGIN_ENOMEM;
  }
  *out = c;
  return 0;
}

static int c_register(void *inst, const char *const *services, size_t n,
                      char *err, size_t errlen) {
  counter *c = inst;
  int rc;
  if (n != 1 || strcmp(services[0], "proto.Counter") != 0) {
    snprintf(err, errlen, "this module serves \"proto.Counter\" only");
    return RPCPLUGIN_EINVAL;
  }
  rc = c->host.add_call_method(c->host.host_ctx, "/proto.Counter/Get",
                               RPCPLUGIN_UNARY, on_get, c, err, errlen);
  if (rc == 0)
    rc = c->host.add_call_method(c->host.host_ctx, "/proto.Counter/Put",
                                 RPCPLUGIN_UNARY, on_put, c, err, errlen);
  if (rc == 0 && RPCPLUGIN_HOST_HAS(&c->host, add_descriptors))
    rc = c->host.add_descriptors(c->host.host_ctx, counter_descriptor_set,
                                 counter_descriptor_set_len, err, errlen);
  return rc;
}

static int c_start(void *inst) {
  (void)inst;
  return 0;
}

static int c_shutdown(void *inst) {
  counter *c = inst;
  ex_worker_stop(&c->worker); /* answers what is queued, then stops */
  return 0;
}

static void c_destroy(void *inst) { free(inst); }

static int c_put_line(void *inst, int ch, const void *data, size_t len) {
  (void)inst, (void)ch, (void)data, (void)len;
  return RPCPLUGIN_EUNSUPPORTED;
}

static int c_get_stats(void *inst, rpcplugin_stats *out) {
  (void)inst, (void)out;
  return RPCPLUGIN_EUNSUPPORTED;
}

static const rpcplugin_module_api counter_api = {
    .magic = RPCPLUGIN_MODULE_MAGIC,
    .abi_major = RPCPLUGIN_ABI_MAJOR,
    .abi_minor = RPCPLUGIN_ABI_MINOR,
    .struct_size = sizeof(rpcplugin_module_api),
    .abi_tag = RPCPLUGIN_ABI_TAG,
    .name = "bidirectional",
    .version = "1.0",
    .init = c_init,
    .register_services = c_register,
    .start = c_start,
    .put_line = c_put_line,
    .shutdown = c_shutdown,
    .destroy = c_destroy,
    .get_stats = c_get_stats,
};

__attribute__((visibility("default"))) const rpcplugin_module_api *
rpcplugin_module_entry(void) {
  return &counter_api;
}
