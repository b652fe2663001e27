/*
 * module.c - the module's one exported symbol, its vtable, and the
 * lifecycle of an instance (init -> register_services -> start ->
 * shutdown -> destroy).
 *
 * Services are described by rp_service tables (one per file); this file
 * only turns the manifest's service names into routes with the host and
 * runs the services' hooks in order.  Shutdown is two-phase: first each
 * service ends gracefully (stdio flushes within its deadline), then every
 * call still alive is cancelled and the instance waits until the last tag
 * came back, so that the host may dlclose right after destroy.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc.h>

#include "engine.h"
#include "stdio_service.h"
#include "broker.h"

#define RP_EXPORT __attribute__((visibility("default")))

/* The descriptor set of the protos in proto/ (rpcplugin_infra_desc.c,
 * made at build time by CMake's rp_descriptor_set). */
extern const unsigned char rp_infra_descriptor_set[];
extern const size_t rp_infra_descriptor_set_len;

static const rp_service *const all_services[RP_NSERVICES] = {
    &rp_broker_service, &rp_stdio_service, &rp_controller_service,
    &rp_health_service};

void rp_log(rp_instance *inst, int level, const char *fmt, ...) {
  char buf[1024];
  va_list ap;
  if (inst->host.log == NULL) return;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  inst->host.log(inst->host.host_ctx, level, buf);
}

/* The call engine's log sink: the host's. */
static void calls_log(void *ctx, int level, const char *msg) {
  rp_log(ctx, level, "%s", msg);
}

int rp_on_poller(rp_instance *inst) {
  return inst->host.on_poller_thread &&
         inst->host.on_poller_thread(inst->host.host_ctx);
}

/* Every routed method arrives here first. */
static void on_call(void *ctx, grpc_call *call, grpc_byte_buffer *req,
                    gpr_timespec deadline) {
  rp_route *route = ctx;
  rp_instance *inst = route->inst;
  int state;
  (void)deadline;
  pthread_mutex_lock(&inst->mu);
  state = inst->state;
  pthread_mutex_unlock(&inst->mu);
  if (state >= RP_STOPPING) {
    if (req) grpc_byte_buffer_destroy(req);
    rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_UNAVAILABLE,
                   "plugin is shutting down", NULL, NULL);
    return;
  }
#ifdef RP_RECORDER
  rp_log(inst, RPCPLUGIN_LOG_INFO, "rpcplugin-recorder: call %s",
         route->path);
#endif
  route->fn(inst, call, req);
}

static void free_tls(rp_instance *inst) {
  free(inst->tls_cert);
  free(inst->tls_key);
  free(inst->tls_peer);
  inst->tls_cert = inst->tls_key = inst->tls_peer = NULL;
}

/* AutoMTLS material of an ABI 1.1 host (struct_size covers the fields and
 * they are set): all three, or none. */
static int copy_tls(rp_instance *inst, const rpcplugin_host_api *host,
                    char *err, size_t errlen) {
  int have = RPCPLUGIN_HOST_HAS(host, tls_cert_pem) +
             RPCPLUGIN_HOST_HAS(host, tls_key_pem) +
             RPCPLUGIN_HOST_HAS(host, tls_peer_cert_pem);
  if (have == 0) return 0;
  if (have != 3) {
    snprintf(err, errlen,
             "host API gives only part of the TLS material (tls_cert_pem, "
             "tls_key_pem and tls_peer_cert_pem go together)");
    return RPCPLUGIN_EINVAL;
  }
  inst->tls_cert = strdup(host->tls_cert_pem);
  inst->tls_key = strdup(host->tls_key_pem);
  inst->tls_peer = strdup(host->tls_peer_cert_pem);
  if (!inst->tls_cert || !inst->tls_key || !inst->tls_peer) {
    snprintf(err, errlen, "out of memory");
    return RPCPLUGIN_ENOMEM;
  }
  return 0;
}

static int m_init(const rpcplugin_host_api *host, const char *config_json,
                  void **out, char *err, size_t errlen) {
  rp_instance *inst;
  size_t n;
  int rc;
  if (out == NULL || host == NULL) {
    snprintf(err, errlen, "init: host API and instance pointer needed");
    return RPCPLUGIN_EINVAL;
  }
  *out = NULL;
  if (host->abi_major != RPCPLUGIN_ABI_MAJOR) {
    snprintf(err, errlen,
             "host speaks ABI %d.%d, this module ABI %d.%d (majors must "
             "match)",
             (int)host->abi_major, (int)host->abi_minor, RPCPLUGIN_ABI_MAJOR,
             RPCPLUGIN_ABI_MINOR);
    return RPCPLUGIN_EABI;
  }
  if (!RPCPLUGIN_HOST_HAS(host, add_method) ||
      !RPCPLUGIN_HOST_HAS(host, request_shutdown) || host->server == NULL ||
      host->cq == NULL) {
    snprintf(err, errlen,
             "host API lacks server, cq, add_method or request_shutdown");
    return RPCPLUGIN_EABI;
  }
  inst = calloc(1, sizeof *inst);
  if (inst == NULL) {
    snprintf(err, errlen, "out of memory");
    return RPCPLUGIN_ENOMEM;
  }
  n = host->struct_size < sizeof inst->host ? host->struct_size
                                            : sizeof inst->host;
  memcpy(&inst->host, host, n);
  if (rp_config_parse(config_json, &inst->cfg, err, errlen) != 0) {
    free(inst);
    return RPCPLUGIN_ECONFIG;
  }
  if ((rc = copy_tls(inst, host, err, errlen)) != 0) {
    free_tls(inst);
    free(inst);
    return rc;
  }
  pthread_mutex_init(&inst->mu, NULL);
  pthread_cond_init(&inst->cv, NULL);
  rp_callset_init(&inst->calls, calls_log, inst);
  inst->state = RP_CREATED;
  grpc_init();
  *out = inst;
  return 0;
}

static int m_register(void *instance, const char *const *services,
                      size_t nservices, char *err, size_t errlen) {
  rp_instance *inst = instance;
  size_t i, j;
  int rc;
  if (inst == NULL || (services == NULL && nservices > 0)) {
    snprintf(err, errlen, "register_services: bad arguments");
    return RPCPLUGIN_EINVAL;
  }
  if (inst->state != RP_CREATED) {
    snprintf(err, errlen, "register_services called twice");
    return RPCPLUGIN_ESTATE;
  }
  for (i = 0; i < nservices; i++) {
    const rp_service *svc = NULL;
    for (j = 0; j < RP_NSERVICES; j++)
      if (services[i] && strcmp(services[i], all_services[j]->name) == 0)
        svc = all_services[j];
    if (svc == NULL) {
      snprintf(err, errlen, "unknown service \"%s\"",
               services[i] ? services[i] : "(null)");
      return RPCPLUGIN_EINVAL;
    }
  }
  /* Enabled in one fixed order, whatever the manifest's: the hooks run in
   * it (at shutdown the broker's streams end before stdio flushes). */
  for (j = 0; j < RP_NSERVICES; j++)
    for (i = 0; i < nservices; i++)
      if (strcmp(services[i], all_services[j]->name) == 0) {
        inst->enabled[inst->nenabled++] = all_services[j];
        break;
      }
  for (i = 0; i < inst->nenabled; i++) {
    const rp_service *svc = inst->enabled[i];
    if (svc->create && (rc = svc->create(inst, err, errlen)) != 0) return rc;
    inst->ncreated = i + 1; /* hooks below run for these only */
  }
  for (i = 0; i < inst->nenabled; i++) {
    const rp_service *svc = inst->enabled[i];
    for (j = 0; j < svc->nmethods; j++) {
      rp_route *route = &inst->routes[inst->nroutes++];
      route->inst = inst;
      route->fn = svc->methods[j].fn;
      route->path = svc->methods[j].path;
      rc = inst->host.add_method(inst->host.host_ctx, svc->methods[j].path,
                                 svc->methods[j].kind, on_call, route, err,
                                 errlen);
      if (rc != 0) return rc;
    }
  }
  /* Server reflection (ABI 1.1 hosts): describe the services.  The whole
   * set goes, whichever services the manifest named: the host lists only
   * services with routed methods.  Reflection is optional: a failure is
   * only logged. */
  if (RPCPLUGIN_HOST_HAS(&inst->host, add_descriptors)) {
    char derr[256] = "";
    if (inst->host.add_descriptors(inst->host.host_ctx,
                                   rp_infra_descriptor_set,
                                   rp_infra_descriptor_set_len, derr,
                                   sizeof derr) != 0)
      rp_log(inst, RPCPLUGIN_LOG_WARN,
             "rpcplugin: descriptors for server reflection not added: %s",
             derr);
  }
  inst->state = RP_REGISTERED;
  return 0;
}

static int m_start(void *instance) {
  rp_instance *inst = instance;
  size_t i;
  pthread_mutex_lock(&inst->mu);
  if (inst->state != RP_REGISTERED) {
    pthread_mutex_unlock(&inst->mu);
    return RPCPLUGIN_ESTATE;
  }
  inst->state = RP_STARTED;
  pthread_mutex_unlock(&inst->mu);
  for (i = 0; i < inst->ncreated; i++)
    if (inst->enabled[i]->start) inst->enabled[i]->start(inst);
  return 0;
}

static int m_shutdown(void *instance) {
  rp_instance *inst = instance;
  size_t i;
  if (inst == NULL) return RPCPLUGIN_EINVAL;
  if (rp_on_poller(inst)) return RPCPLUGIN_EWRONGTHREAD;
  pthread_mutex_lock(&inst->mu);
  if (inst->state >= RP_STOPPING) {
    /* Idempotent: a second caller waits for the first to finish. */
    while (inst->state != RP_STOPPED) pthread_cond_wait(&inst->cv, &inst->mu);
    pthread_mutex_unlock(&inst->mu);
    return 0;
  }
  inst->state = RP_STOPPING;
  pthread_mutex_unlock(&inst->mu);

  for (i = 0; i < inst->ncreated; i++)
    if (inst->enabled[i]->stop) inst->enabled[i]->stop(inst);
  pthread_mutex_lock(&inst->mu);
  inst->state = RP_CANCELLING;
  pthread_mutex_unlock(&inst->mu);
  rp_callset_cancel_and_drain(&inst->calls);

  pthread_mutex_lock(&inst->mu);
  inst->state = RP_STOPPED;
  pthread_cond_broadcast(&inst->cv);
  pthread_mutex_unlock(&inst->mu);
  return 0;
}

static void m_destroy(void *instance) {
  rp_instance *inst = instance;
  size_t i;
  if (inst == NULL) return;
  for (i = 0; i < inst->ncreated; i++)
    if (inst->enabled[i]->destroy) inst->enabled[i]->destroy(inst);
  rp_callset_destroy(&inst->calls);
  pthread_cond_destroy(&inst->cv);
  pthread_mutex_destroy(&inst->mu);
  free_tls(inst);
  free(inst);
  grpc_shutdown();
}

static int m_put_line(void *instance, int channel, const void *data,
                      size_t len) {
  rp_instance *inst = instance;
  if (inst == NULL) return RPCPLUGIN_EINVAL;
  if (inst->stdio == NULL) return RPCPLUGIN_EUNSUPPORTED;
  return rp_stdio_put(inst->stdio, channel, data, len);
}

static int m_get_stats(void *instance, rpcplugin_stats *out) {
  rp_instance *inst = instance;
  rpcplugin_stats s;
  size_t n;
  if (inst == NULL || out == NULL || out->struct_size < 8)
    return RPCPLUGIN_EINVAL;
  memset(&s, 0, sizeof s);
  if (inst->stdio) rp_stdio_stats(inst->stdio, &s);
  if (inst->broker) rp_broker_stats(inst->broker, &s);
  s.calls_active = rp_callset_count(&inst->calls);
  s.calls_total = atomic_load(&inst->calls.total);
  n = out->struct_size < sizeof s ? out->struct_size : sizeof s;
  s.struct_size = out->struct_size;
  memcpy(out, &s, n);
  return 0;
}

/* ----------------------------------------------------------- handover */

int rp_handover_add_stream(rp_handover *ho, const char *method,
                           const rp_call_handoff *ex, int recv_ended,
                           void *unsent, size_t unsent_len) {
  rpcplugin_handover_stream *hs;
  if (ho->nstreams == ho->cap) {
    size_t cap = ho->cap ? 2 * ho->cap : 8;
    rpcplugin_handover_stream *more =
        realloc(ho->streams, cap * sizeof *more);
    if (more == NULL) {
      free(unsent);
      return RPCPLUGIN_ENOMEM;
    }
    ho->streams = more;
    ho->cap = cap;
  }
  hs = &ho->streams[ho->nstreams++];
  memset(hs, 0, sizeof *hs);
  hs->method = method;
  hs->call = ex->call;
  hs->send = ex->send;
  hs->recv = ex->recv;
  hs->close = ex->close;
  hs->metadata_sent = ex->md_sent;
  hs->recv_ended = recv_ended;
  hs->unsent = unsent;
  hs->unsent_len = unsent ? unsent_len : 0;
  return 0;
}

uint8_t *rp_frame_append(uint8_t *buf, size_t *len, const void *msg,
                         size_t n) {
  uint8_t *more;
  if (n > UINT32_MAX || (more = realloc(buf, *len + 4 + n)) == NULL)
    return NULL;
  more[*len] = (uint8_t)n;
  more[*len + 1] = (uint8_t)(n >> 8);
  more[*len + 2] = (uint8_t)(n >> 16);
  more[*len + 3] = (uint8_t)(n >> 24);
  memcpy(more + *len + 4, msg, n);
  *len += 4 + n;
  return more;
}

int rp_handover_add_stdio(rp_handover *ho, int channel, const void *data,
                          size_t len) {
  uint8_t *p;
  if (len > UINT32_MAX) return RPCPLUGIN_ENOMEM;
  if (ho->stdio_cap - ho->stdio_len < 5 + len) {
    size_t cap = ho->stdio_cap ? ho->stdio_cap : 4096;
    uint8_t *more;
    while (cap - ho->stdio_len < 5 + len) cap *= 2;
    if ((more = realloc(ho->stdio, cap)) == NULL) return RPCPLUGIN_ENOMEM;
    ho->stdio = more;
    ho->stdio_cap = cap;
  }
  p = ho->stdio + ho->stdio_len;
  p[0] = (uint8_t)channel;
  p[1] = (uint8_t)len;
  p[2] = (uint8_t)(len >> 8);
  p[3] = (uint8_t)(len >> 16);
  p[4] = (uint8_t)(len >> 24);
  memcpy(p + 5, data, len);
  ho->stdio_len += 5 + len;
  return 0;
}

void rp_handover_free(rp_handover *ho) {
  size_t i;
  for (i = 0; i < ho->nstreams; i++) free((void *)ho->streams[i].unsent);
  free(ho->streams);
  free(ho->stdio);
  free(ho->peer);
  free(ho->host);
  memset(ho, 0, sizeof *ho);
}

static int m_handover_out(void *instance, rpcplugin_handover *out) {
  rp_instance *inst = instance;
  rp_handover *ho;
  int rc = 0;
  if (inst == NULL || out == NULL) return RPCPLUGIN_EINVAL;
  if (rp_on_poller(inst)) return RPCPLUGIN_EWRONGTHREAD;
  pthread_mutex_lock(&inst->mu);
  if (inst->state != RP_STARTED || inst->handover) {
    pthread_mutex_unlock(&inst->mu);
    return RPCPLUGIN_ESTATE;
  }
  ho = calloc(1, sizeof *ho);
  if (ho == NULL) {
    pthread_mutex_unlock(&inst->mu);
    return RPCPLUGIN_ENOMEM;
  }
  inst->handover = ho;
  pthread_mutex_unlock(&inst->mu);
  if (inst->broker) rc = rp_broker_handover_out(inst->broker, ho);
  if (inst->stdio) {
    int r = rp_stdio_handover_out(inst->stdio, ho);
    if (rc == 0) rc = r;
  }
  out->streams = ho->streams;
  out->nstreams = ho->nstreams;
  out->stdio = ho->stdio;
  out->stdio_len = ho->stdio_len;
  if (out->struct_size >= offsetof(rpcplugin_handover, nhost_adverts) +
                              sizeof(size_t)) {
    out->peer_adverts = ho->peer;
    out->npeer_adverts = ho->npeer;
    out->host_adverts = ho->host;
    out->nhost_adverts = ho->nhost;
  }
  return rc;
}

static int m_handover_in(void *instance, const rpcplugin_handover *h,
                         char *err, size_t errlen) {
  rp_instance *inst = instance;
  size_t i;
  if (inst == NULL || h == NULL) return RPCPLUGIN_EINVAL;
  if (inst->stdio) rp_stdio_handover_in(inst->stdio, h);
  if (inst->broker) rp_broker_handover_in(inst->broker, h);
  /* Streams of a service this instance does not serve: ended. */
  for (i = 0; i < h->nstreams; i++) {
    const char *m = h->streams[i].method;
    if ((inst->stdio && strcmp(m, "/plugin.GRPCStdio/StreamStdio") == 0) ||
        (inst->broker && strcmp(m, "/plugin.GRPCBroker/StartStream") == 0))
      continue;
    snprintf(err, errlen, "stream %s not served here: ended", m);
    grpc_call_cancel_with_status(h->streams[i].call, GRPC_STATUS_UNAVAILABLE,
                                 "plugin swapped", NULL);
    grpc_call_unref(h->streams[i].call);
  }
  return 0;
}

static void m_handover_done(void *instance, rpcplugin_handover *h) {
  rp_instance *inst = instance;
  (void)h;
  if (inst == NULL || inst->handover == NULL) return;
  rp_handover_free(inst->handover);
  free(inst->handover);
  inst->handover = NULL;
}

#ifdef RP_RECORDER
#define RP_MODULE_NAME "rpcplugin-recorder"
#else
#define RP_MODULE_NAME "rpcplugin-services"
#endif

#define MODULE_API_FIELDS(minor, size)                         \
  .magic = RPCPLUGIN_MODULE_MAGIC, .abi_major = RPCPLUGIN_ABI_MAJOR, \
  .abi_minor = (minor), .struct_size = (size), .flags = 0,       \
  .abi_tag = RPCPLUGIN_ABI_TAG, .name = RP_MODULE_NAME,          \
  .version = RPCPLUGIN_VERSION, .init = m_init,                   \
  .register_services = m_register, .start = m_start,              \
  .put_line = m_put_line, .shutdown = m_shutdown,                 \
  .destroy = m_destroy, .get_stats = m_get_stats,                 \
  .broker_advertise = rp_broker_advertise,                        \
  .broker_wait_advertised = rp_broker_wait_advertised,            \
  .broker_knock = rp_broker_knock,                                \
  .broker_channel = rp_broker_channel,                            \
  .broker_release_channel = rp_broker_release_channel,            \
  .handover_out = m_handover_out, .handover_in = m_handover_in,   \
  .handover_done = m_handover_done

#if defined(RPCPLUGIN_TEST_OLDER_MINOR)
/* Built only for the ABI matrix tests: the same module as ABI 1.1 shipped
 * it, its vtable ending before the 1.2 entries (no handover), so a newer
 * host meets a smaller struct_size. */
static const rpcplugin_module_api module_api = {
    MODULE_API_FIELDS(1, offsetof(rpcplugin_module_api, handover_out))};

RP_EXPORT const rpcplugin_module_api *rpcplugin_module_entry(void) {
  return &module_api;
}
#elif !defined(RPCPLUGIN_TEST_NEWER_MINOR)
static const rpcplugin_module_api module_api = {
    MODULE_API_FIELDS(RPCPLUGIN_ABI_MINOR, sizeof(rpcplugin_module_api))};

RP_EXPORT const rpcplugin_module_api *rpcplugin_module_entry(void) {
  return &module_api;
}
#else
/* Built only for the loader's tests: the same module as a hypothetical
 * newer minor would ship it, with entries this host does not know
 * appended after the ones it does. */
struct newer_api {
  rpcplugin_module_api base;
  void (*later[4])(void);
};
static const struct newer_api module_api = {
    .base = {MODULE_API_FIELDS(RPCPLUGIN_ABI_MINOR + 1,
                               sizeof(struct newer_api))},
    .later = {NULL, NULL, NULL, NULL}};

RP_EXPORT const rpcplugin_module_api *rpcplugin_module_entry(void) {
  return &module_api.base;
}
#endif
