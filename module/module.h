/*
 * module.h - one module instance and the services built on it.
 *
 * An instance is what init returns: the host API it was given, its
 * configuration, the list of its live calls (so shutdown can cancel and
 * wait for them), and the state of each enabled service.  Every service
 * file (controller.c, health.c, stdio.c, broker.c) describes itself with an
 * rp_service and builds on the call engine in engine.h; none of them talks
 * to the completion queue directly.
 */
#ifndef RPCPLUGIN_MODULE_H
#define RPCPLUGIN_MODULE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <rpcplugin/rpcplugin.h>

#include "config.h"

typedef struct rp_instance rp_instance;
typedef struct rp_call rp_call;
#define RP_CALL_OWNER struct rp_instance
#include "callengine.h"
typedef struct rp_stdio rp_stdio;
typedef struct rp_broker rp_broker;

/* A method's handler: takes one reference of call and ownership of req
 * (may be NULL).  Poller thread; never blocks. */
typedef void (*rp_method_fn)(rp_instance *inst, grpc_call *call,
                             grpc_byte_buffer *req);

typedef struct rp_method_def {
  const char *path;
  int kind; /* rpcplugin_method_kind */
  rp_method_fn fn;
} rp_method_def;

typedef struct rp_service {
  const char *name; /* as in the manifest */
  const rp_method_def *methods;
  size_t nmethods;
  /* Optional hooks, control thread. */
  int (*create)(rp_instance *inst, char *err, size_t errlen);
  void (*start)(rp_instance *inst);
  /* Graceful end before calls are cancelled (stdio flushes here). */
  void (*stop)(rp_instance *inst);
  /* After every call of the instance is gone. */
  void (*destroy)(rp_instance *inst);
} rp_service;

extern const rp_service rp_controller_service;
extern const rp_service rp_health_service;
extern const rp_service rp_stdio_service;
extern const rp_service rp_broker_service;

enum rp_state {
  RP_CREATED,
  RP_REGISTERED,
  RP_STARTED,
  RP_STOPPING,   /* services finishing gracefully */
  RP_CANCELLING, /* every remaining and new call is cancelled */
  RP_STOPPED
};

#define RP_MAX_ROUTES 8
#define RP_NSERVICES 4

typedef struct rp_route {
  rp_instance *inst;
  rp_method_fn fn;
  const char *path;
} rp_route;

struct rp_instance {
  rpcplugin_host_api host; /* copy; fields beyond host.struct_size zero */
  rp_config cfg;

  pthread_mutex_t mu; /* state */
  pthread_cond_t cv;
  int state;
  rp_callset calls; /* live calls, cancelled and drained at shutdown */
  atomic_int shutdown_fired;

  const rp_service *enabled[RP_NSERVICES];
  size_t nenabled;
  size_t ncreated; /* enabled[0..ncreated) were created successfully */
  rp_route routes[RP_MAX_ROUTES];
  size_t nroutes;

  rp_stdio *stdio;   /* NULL unless plugin.GRPCStdio is enabled */
  rp_broker *broker; /* NULL unless plugin.GRPCBroker is enabled */

  /* AutoMTLS (host API 1.1 tls_*), copied at init: our certificate and
   * key, and the client's certificate.  All NULL without AutoMTLS. */
  char *tls_cert, *tls_key, *tls_peer;

  struct rp_handover *handover; /* what handover_out described, until done */
};

/* What handover_out describes (rpcplugin_handover), owned by the old
 * instance until handover_done. */
typedef struct rp_handover {
  rpcplugin_handover_stream *streams;
  size_t nstreams, cap;
  uint8_t *stdio;
  size_t stdio_len, stdio_cap;
  rpcplugin_conn_info *peer, *host;
  size_t npeer, nhost;
} rp_handover;

/* Append a stream (unsent: framed messages, malloc'd, taken) / a stdio
 * record.  0 or ENOMEM. */
int rp_handover_add_stream(rp_handover *ho, const char *method,
                           const rp_call_handoff *ex, int recv_ended,
                           void *unsent, size_t unsent_len);
/* Append msg to a buffer of framed messages (4-byte little-endian length,
 * bytes); returns the buffer, or NULL on out of memory (buf then still
 * valid). */
uint8_t *rp_frame_append(uint8_t *buf, size_t *len, const void *msg,
                         size_t n);
int rp_handover_add_stdio(rp_handover *ho, int channel, const void *data,
                          size_t len);
void rp_handover_free(rp_handover *ho);
/* The services' parts: out (old instance, control thread), in (new). */
int rp_stdio_handover_out(rp_stdio *s, rp_handover *ho);
void rp_stdio_handover_in(rp_stdio *s, const rpcplugin_handover *h);
int rp_broker_handover_out(rp_broker *b, rp_handover *ho);
void rp_broker_handover_in(rp_broker *b, const rpcplugin_handover *h);

void rp_log(rp_instance *inst, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int rp_on_poller(rp_instance *inst);

#endif
