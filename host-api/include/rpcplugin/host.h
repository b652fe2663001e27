/*
 * host.h - the host side of rpcplugin: manifests, the runtime that owns the
 * completion queue and method routes, and the module loader.
 *
 * A host that wants go-plugin's services does, on one control thread:
 *
 *   grpc_init();
 *   grpc_server *server = grpc_server_create(NULL, NULL);
 *   grpc_server_add_http2_port(server, "unix:/path", creds);
 *   rpcplugin_runtime_create(&opts, &rt, &err);      // registers the cq
 *   rpcplugin_manifest_load("default.json", &m, &err);
 *   rpcplugin_module_load(rt, m, NULL, &mod, &err);  // init + register
 *   grpc_server_start(server);
 *   rpcplugin_runtime_start(rt, &err);                // pollers + start
 *   ... rpcplugin_module_put_line(mod, RPCPLUGIN_STDOUT, "hi\n", 3) ...
 *   ... opts.on_shutdown fires (client called Shutdown) or a signal ...
 *   rpcplugin_runtime_shutdown(rt);   // stop serving, flush, stop modules
 *   ... join the host threads that call put_line (they now get
 *       RPCPLUGIN_ESHUTDOWN instead of waiting) ...
 *   rpcplugin_runtime_destroy(rt);    // destroy and dlclose the modules
 *   grpc_server_destroy(server);
 *   rpcplugin_manifest_free(m);
 *   grpc_shutdown();
 *
 * The runtime answers UNIMPLEMENTED for every method no module (and no
 * host handler added with rpcplugin_runtime_add_method) serves: gRPC's C
 * core does not do that by itself.  It therefore owns the server's
 * "unregistered call" requests; a host must not call
 * grpc_server_request_call itself.
 *
 * Errors: functions return 0 or a negative RPCPLUGIN_E* code and, when the
 * caller passes an rpcplugin_error, a sentence that names the file, field
 * or symbol that failed.
 */
#ifndef RPCPLUGIN_HOST_H
#define RPCPLUGIN_HOST_H

#include <rpcplugin/rpcplugin.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- errors */

typedef struct rpcplugin_error {
  int code;
  char message[1024];
} rpcplugin_error;

/* Static description / symbolic name ("RPCPLUGIN_EABI") of a code. */
const char *rpcplugin_strerror(int code);
const char *rpcplugin_err_name(int code);

/* -------------------------------------------------------------- manifest */

typedef struct rpcplugin_manifest rpcplugin_manifest;

/* Service bits, in the order of docs/manifest.md. */
enum rpcplugin_service {
  RPCPLUGIN_SVC_BROKER = 1 << 0,     /* plugin.GRPCBroker */
  RPCPLUGIN_SVC_STDIO = 1 << 1,      /* plugin.GRPCStdio */
  RPCPLUGIN_SVC_CONTROLLER = 1 << 2, /* plugin.GRPCController */
  RPCPLUGIN_SVC_HEALTH = 1 << 3      /* grpc.health.v1.Health */
};

/* Read and validate a manifest file.  Unknown keys and wrong types are
 * errors naming the file, the field and what was expected.  A file
 * writable by its group or by everyone, or owned by anyone but root or the
 * user the process runs as, is refused with RPCPLUGIN_EREFUSED (checked on
 * the open descriptor; rpcplugin_module_load checks the module the same
 * way). */
int rpcplugin_manifest_load(const char *path, rpcplugin_manifest **out,
                            rpcplugin_error *err);

/* The same from memory; `origin` names the source in messages and its
 * folder is the base for a relative "module" (NULL: current directory). */
int rpcplugin_manifest_parse(const char *json, size_t len, const char *origin,
                             rpcplugin_manifest **out, rpcplugin_error *err);

void rpcplugin_manifest_free(rpcplugin_manifest *m);

const char *rpcplugin_manifest_path(const rpcplugin_manifest *m);
const char *rpcplugin_manifest_name(const rpcplugin_manifest *m);
const char *rpcplugin_manifest_module(const rpcplugin_manifest *m);
int rpcplugin_manifest_protocol_version(const rpcplugin_manifest *m);
void rpcplugin_manifest_abi_version(const rpcplugin_manifest *m, int *major,
                                    int *minor);
/* Bitmask of enum rpcplugin_service: the infrastructure services named. */
unsigned rpcplugin_manifest_services(const rpcplugin_manifest *m);
/* Every service the manifest names, in order (infrastructure or
 * application: fully qualified gRPC names).  (Added in 0.2.) */
size_t rpcplugin_manifest_service_count(const rpcplugin_manifest *m);
const char *rpcplugin_manifest_service_name(const rpcplugin_manifest *m,
                                            size_t i);
/* 1 when the manifest names application services (no infrastructure
 * service): an application module, served next to an infrastructure
 * module.  (Added in 0.2.) */
int rpcplugin_manifest_is_application(const rpcplugin_manifest *m);
/* An application manifest's "infrastructure" (the infrastructure
 * manifest to serve next to it), or NULL when it names none. */
const char *rpcplugin_manifest_infrastructure(const rpcplugin_manifest *m);
/* Load the infrastructure manifest an application manifest asks for:
 * its "infrastructure", default "host.json".  A value with a slash is a
 * path relative to the application manifest's folder (or absolute); a bare
 * name is looked for in that folder, in each folder of
 * $RPCPLUGIN_MANIFEST_PATH, in share/rpcplugin/manifests next to the
 * installed librpcplugin (<libdir>/../share, relocatable), and in the
 * folder configured at build time.  (Added in 0.2.) */
int rpcplugin_manifest_load_infrastructure(const rpcplugin_manifest *app,
                                           rpcplugin_manifest **out,
                                           rpcplugin_error *err);
/* The "config" object as compact JSON ("{}" when absent). */
const char *rpcplugin_manifest_config_json(const rpcplugin_manifest *m);

/* --------------------------------------------------------------- runtime */

typedef struct rpcplugin_runtime rpcplugin_runtime;

typedef struct rpcplugin_runtime_options {
  size_t struct_size;  /* sizeof(rpcplugin_runtime_options) */
  grpc_server *server; /* not started yet; the host keeps ownership */
  /* Called once, on a poller thread, when a client asked for shutdown.
   * Take note and return; run rpcplugin_runtime_shutdown elsewhere. */
  void (*on_shutdown)(void *user_data);
  void *user_data;
  /* Optional: log sink for runtime and modules (any thread). */
  void (*log)(void *user_data, int level, const char *msg);
  int log_level;         /* most verbose level passed on; default ERROR..INFO */
  unsigned poll_threads; /* 0 means 1 */
  /* At shutdown, once the modules stopped: how long clients may take to
   * read what was sent to them before their connections are cut, in ms.
   * The wait ends early when the connections closed (go-plugin clients
   * close right after Shutdown), when no connected socket of the process
   * holds bytes its peer has not read yet, or when those bytes stopped
   * going down for 100 ms (nobody reads: a C-core client keeps an idle
   * connection open and does not read it).  0 means RPCPLUGIN_CLOSE_GRACE_MS; negative: cut at
   * once.  A client that writes anything (a window update, a ping ack) to a
   * connection the server already closed fails all its calls, even those
   * whose reply it had received but not read.  (Added in librpcplugin 0.2;
   * a smaller struct_size means the default.) */
  int close_grace_ms;
  /* With go-plugin's AutoMTLS: the listener's certificate and key and the
   * client's certificate (PEM), passed to modules (rpcplugin_host_api
   * tls_*) for the connections the plugin makes to the client.  NULL
   * without TLS; copied.  (Added in 0.2.) */
  const char *tls_cert_pem;
  const char *tls_key_pem;
  const char *tls_peer_cert_pem;
} rpcplugin_runtime_options;

#define RPCPLUGIN_CLOSE_GRACE_MS 1000

/* Before grpc_server_start: creates and registers the completion queue. */
int rpcplugin_runtime_create(const rpcplugin_runtime_options *opts,
                             rpcplugin_runtime **out, rpcplugin_error *err);

/* After grpc_server_start: starts the pollers, requests calls, and calls
 * start on every module loaded so far. */
int rpcplugin_runtime_start(rpcplugin_runtime *rt, rpcplugin_error *err);

/* Serve a method of the host's own (application services).  Same rules as
 * rpcplugin_host_api.add_method. */
int rpcplugin_runtime_add_method(rpcplugin_runtime *rt, const char *path,
                                 int kind, rpcplugin_call_handler handler,
                                 void *handler_ctx, rpcplugin_error *err);

/* Describe the host's own services for server reflection: a serialized
 * google.protobuf.FileDescriptorSet (copied).  (Added in 0.2.) */
int rpcplugin_runtime_add_descriptors(rpcplugin_runtime *rt,
                                      const void *descriptor_set, size_t len,
                                      rpcplugin_error *err);

/* Serve a method of the host's own through the application call API
 * (rpcplugin_call, <rpcplugin/rpcplugin.h>): no batches or tags.  Before
 * grpc_server_start.  At shutdown the calls still unfinished are cancelled
 * (on_cancel runs) and the runtime waits up to 5 s for the handlers to
 * finish them.  (Added in 0.2.) */
int rpcplugin_runtime_add_call_method(rpcplugin_runtime *rt, const char *path,
                                      int kind,
                                      rpcplugin_method_handler handler,
                                      void *handler_ctx, rpcplugin_error *err);

/* Serve gRPC server reflection, grpc.reflection.v1alpha.ServerReflection
 * (the version go-plugin registers; grpcurl-style tools list and describe
 * services with it): routes its ServerReflectionInfo method through the
 * call API and answers from the descriptors modules added (host API
 * add_descriptors) and the host added (rpcplugin_runtime_add_descriptors),
 * plus reflection.proto's own.  list_services names every service with a
 * method routed at the time of the request; files come with their
 * transitive imports; an unknown file or symbol gets an error_response
 * NOT_FOUND.  Before grpc_server_start, once (RPCPLUGIN_EEXIST after).
 * (Added in 0.2.) */
int rpcplugin_runtime_enable_reflection(rpcplugin_runtime *rt,
                                        rpcplugin_error *err);

/* The completion queue the runtime polls; tags must begin with an
 * rpcplugin_tag. */
grpc_completion_queue *rpcplugin_runtime_cq(rpcplugin_runtime *rt);

/* The graceful path, idempotent, from a control thread: stop serving new
 * calls, shut every module down (stdio streams flush first, blocked
 * put_line calls return RPCPLUGIN_ESHUTDOWN), let the clients read what
 * was sent, stop accepting (grpc_server_shutdown_and_notify), cancel what
 * is left, drain the queue and join the pollers.  Modules stay loaded,
 * answering every entry with RPCPLUGIN_ESHUTDOWN, until
 * rpcplugin_runtime_destroy.  Returns RPCPLUGIN_EWRONGTHREAD on a poller
 * thread. */
int rpcplugin_runtime_shutdown(rpcplugin_runtime *rt);

/* The first half of rpcplugin_runtime_shutdown, for a host that wants to
 * exit as soon as nothing a client can see is pending: stop serving, shut
 * the modules down (streams flush and end with OK, put_line answers
 * RPCPLUGIN_ESHUTDOWN), give the clients up to close_grace_ms to read what
 * was sent, then stop accepting (GOAWAY).  A host that calls _exit after it (and after removing its
 * socket) loses nothing; rpcplugin_runtime_shutdown does the rest (cuts
 * what is left, drains the queue, joins the pollers) and may follow at any
 * time.  Calls from several threads wait for the one that drains.  Returns
 * RPCPLUGIN_EWRONGTHREAD on a poller thread.  (Added in 0.2.) */
int rpcplugin_runtime_drain(rpcplugin_runtime *rt);

/* Shut down if needed, then destroy and dlclose every module and free the
 * runtime.  Call it once no host thread uses a module any more.  The host
 * then destroys its server. */
void rpcplugin_runtime_destroy(rpcplugin_runtime *rt);

/* ---------------------------------------------------------------- loader */

typedef struct rpcplugin_module rpcplugin_module;

typedef struct rpcplugin_load_options {
  size_t struct_size; /* sizeof(rpcplugin_load_options) */
  /* Folders searched for a "module" without a slash, after the manifest's
   * own folder and before $RPCPLUGIN_MODULE_PATH and the install folder.
   * NULL-terminated; may be NULL. */
  const char *const *search_path;
} rpcplugin_load_options;

/*
 * Resolve the manifest's module file, dlopen it, check its ABI header
 * (magic, major, build tag, size) before calling anything, then init it with
 * the manifest's config and register the manifest's services.  When the
 * runtime already started, the module is started too.  opts may be NULL.
 */
int rpcplugin_module_load(rpcplugin_runtime *rt, const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts,
                          rpcplugin_module **out, rpcplugin_error *err);

/* Unroute, shut down, destroy, dlclose.  Control thread; no other host
 * thread may be inside an entry of this module. */
int rpcplugin_module_unload(rpcplugin_module *mod);

/* The module's vtable (checked), and its instance pointer. */
const rpcplugin_module_api *rpcplugin_module_api_of(
    const rpcplugin_module *mod);
void *rpcplugin_module_instance(const rpcplugin_module *mod);
/* Resolved path of the loaded file. */
const char *rpcplugin_module_path(const rpcplugin_module *mod);
/* The infrastructure services its manifest named (enum rpcplugin_service
 * bits; 0 for an application module).  (Added in 0.2.) */
unsigned rpcplugin_module_services_of(const rpcplugin_module *mod);

/* Convenience wrappers; RPCPLUGIN_EUNSUPPORTED when the module lacks the
 * entry. */
int rpcplugin_module_put_line(rpcplugin_module *mod, int channel,
                              const void *data, size_t len);
int rpcplugin_module_get_stats(rpcplugin_module *mod, rpcplugin_stats *out);
/* The broker entries of rpcplugin_module_api, through the handle (they
 * follow swaps).  (Added in 0.3.) */
int rpcplugin_module_broker_advertise(rpcplugin_module *mod,
                                      uint32_t service_id,
                                      const char *network,
                                      const char *address);
int rpcplugin_module_broker_wait_advertised(rpcplugin_module *mod,
                                            uint32_t service_id,
                                            int timeout_ms,
                                            rpcplugin_conn_info *out);
int rpcplugin_module_broker_knock(rpcplugin_module *mod, uint32_t service_id,
                                  const char *network, const char *address,
                                  int timeout_ms, char *err, size_t errlen);

/* ---------------------------------------------------------- multiplexing */

/*
 * go-plugin's gRPC broker multiplexing (client option GRPCBrokerMultiplex,
 * env PLUGIN_MULTIPLEX_GRPC=true; go-plugin >= 1.6), the plugin's side
 * (docs/multiplexing.md).  The host accepts the client's one connection and
 * hands it over; the runtime runs a yamux server session on it:
 *  - the first stream the client opens, and every later one without a
 *    knock, is bridged to main_path, a unix socket on which the host's
 *    grpc_server listens with the credentials its public listener would
 *    have (TLS under AutoMTLS: each stream carries its own TLS);
 *  - a stream after the client's knock for id (plugin.GRPCBroker, which
 *    the broker module answers through the host API's broker_mux_knock)
 *    is bridged to id's route (rpcplugin_runtime_mux_route, or a
 *    broker_advertise through rpcplugin_module_broker_advertise);
 *  - broker_dial (an application module's go-plugin Dial) returns a
 *    channel to a unix socket in dial_dir; each connection it makes
 *    becomes knock, ack, a new stream to the client.
 * (All added in 0.4.)
 */
typedef struct rpcplugin_mux_options {
  uint32_t struct_size;  /* sizeof(rpcplugin_mux_options) */
  int fd;                /* the accepted connection; the runtime owns it
                            from the call on, even when it fails */
  const char *main_path; /* the server's private unix socket (a path) */
  const char *dial_dir;  /* a private directory (0700) for dial sockets */
  int keepalive_ms;      /* yamux ping interval; 0: 30000 (yamux's
                            default); < 0: none.  A ping not answered by
                            the next one ends the session. */
  uint32_t max_streams;  /* streams open at once; 0: 1024 */
  /* The session ended (the client closed the connection, broke the
   * protocol, stopped answering pings, or rpcplugin_runtime_mux_stop);
   * why is a sentence.  Called once, on the multiplexer's thread: take
   * note and return.  May be NULL. */
  void (*on_end)(void *ud, const char *why);
  /* Log lines (level RPCPLUGIN_LOG_*), any thread.  May be NULL. */
  void (*log)(void *ud, int level, const char *msg);
  void *ud;
  /* Called once by rpcplugin_runtime_multiplex, on the calling thread,
   * when the runtime multiplexes and before the first byte of the
   * connection is read: add here the routes a client may knock for at
   * once (rpcplugin_runtime_mux_route, rpcplugin_module_broker_advertise).
   * A route added later races the client's first knock, which go-plugin
   * answers "no listener for id N".  May be NULL. */
  void (*on_ready)(void *ud);
} rpcplugin_mux_options;

typedef struct rpcplugin_mux_stats {
  uint32_t struct_size; /* the caller's sizeof */
  uint32_t connections; /* 1 */
  uint64_t streams_accepted; /* opened by the client and bridged */
  uint64_t streams_brokered; /* ...of them, after a knock */
  uint64_t streams_refused;  /* opened by the client, refused (RST) */
  uint64_t streams_opened;   /* opened by the plugin (dials) */
  uint64_t streams_open;     /* open now */
  uint64_t knocks_accepted;  /* client knocks acked */
  uint64_t dials;            /* plugin dials (connections to dial sockets) */
  uint64_t dial_failures;    /* ...whose knock failed */
  uint64_t bytes_in, bytes_out; /* stream payload from / to the client */
  uint32_t go_away_received, go_away_code;
  int ended;
  char end_reason[128];
} rpcplugin_mux_stats;

/* Start multiplexing on o->fd.  After rpcplugin_runtime_start, once per
 * runtime.  RPCPLUGIN_ESTATE when already multiplexing. */
int rpcplugin_runtime_multiplex(rpcplugin_runtime *rt,
                                const rpcplugin_mux_options *o,
                                rpcplugin_error *err);
/* 1 when the runtime multiplexes. */
int rpcplugin_runtime_multiplexed(rpcplugin_runtime *rt);
/* Where the client's streams after a knock for id go. */
int rpcplugin_runtime_mux_route(rpcplugin_runtime *rt, uint32_t id,
                                const char *network, const char *address);
/* Send yamux GO_AWAY (no new streams; at the start of a shutdown). */
void rpcplugin_runtime_mux_go_away(rpcplugin_runtime *rt);
/* Forward what the local sides still have (up to flush_ms), then close
 * the connection.  rpcplugin_runtime_destroy does it too. */
void rpcplugin_runtime_mux_stop(rpcplugin_runtime *rt, int flush_ms);
/* RPCPLUGIN_ESTATE when not multiplexing. */
int rpcplugin_runtime_mux_stats(rpcplugin_runtime *rt,
                                rpcplugin_mux_stats *out);

/* ------------------------------------------------------------------ swap */

/* What a swap did, for logs and benchmarks.  (Added in 0.3.) */
typedef struct rpcplugin_swap_info {
  size_t struct_size; /* the caller's sizeof(rpcplugin_swap_info) */
  double load_ms;     /* load, check, init, register, start the new one */
  double switch_ms;   /* routes and handle moved, streams handed over */
  double retire_ms;   /* the old one drained, shut down and dlclosed */
  double total_ms;
  int handover;       /* 0: streams handed over; RPCPLUGIN_EUNSUPPORTED:
                         one side lacks it (the old one's streams ended) */
  size_t calls_left;  /* old application calls cancelled after the wait */
} rpcplugin_swap_info;

/*
 * Replace the implementation behind mod with the one manifest m names,
 * while the server serves (docs/abi.md, "Live swap").  Control thread, not
 * a poller; one swap per module at a time (RPCPLUGIN_ESTATE).  m must name
 * the same services as the manifest mod was loaded from (RPCPLUGIN_EMANIFEST
 * otherwise).  The new file is loaded, checked, initialised, registered and
 * started beside the old one (from a private copy when the same file is
 * loaded already); any failure there returns its error naming the file
 * and the reason, with the old instance serving untouched.  Then, at once:
 * new calls reach the new instance, host threads' entries go to it (the
 * handle stays valid; put_line and the broker entries never fail because
 * of the swap), and the old one hands over its open streams, queued output
 * and broker state (module ABI 1.2; without it, its streams end as at a
 * shutdown).  Last, the old instance's application calls in flight finish
 * (up to 5 s, then they are cancelled), it shuts down and is dlclosed.
 * info (may be NULL) receives the timings.  (Added in 0.3.)
 */
int rpcplugin_module_swap(rpcplugin_module *mod, const rpcplugin_manifest *m,
                          const rpcplugin_load_options *opts,
                          rpcplugin_swap_info *info, rpcplugin_error *err);

/* Swaps done on this handle. */
unsigned long rpcplugin_module_swaps(rpcplugin_module *mod);

#ifdef __cplusplus
}
#endif

#endif /* RPCPLUGIN_HOST_H */
