/*
 * internal.h - shared between the files of the host library; not
 * installed.
 */
#ifndef RPCPLUGIN_HOST_INTERNAL_H
#define RPCPLUGIN_HOST_INTERNAL_H

#include <rpcplugin/host.h>

#define RP_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* Set err (may be NULL) and return code. */
int rp_error(rpcplugin_error *err, int code, const char *fmt, ...)
    RP_PRINTF(3, 4);
void rp_error_clear(rpcplugin_error *err);

/* The loader's trust rule for a file it reads or loads (what sudo and
 * CrowdSec check of their plugins), on the open descriptor's fstat: a file
 * that anyone but root or the user the host runs as owns, or that its
 * group or everyone may write, is refused with RPCPLUGIN_EREFUSED and a
 * sentence naming the file, its owner or mode, and the rule.  what is
 * "manifest" or "module"; where (may be NULL) the manifest that named it. */
struct stat;
int rp_check_trusted(const struct stat *st, const char *what,
                     const char *path, const char *where,
                     rpcplugin_error *err);

/* Wait until no poller is still inside a callback it had started (the
 * loader, before a dlclose on a live server). */
void rp_runtime_quiesce(rpcplugin_runtime *rt);

/* Manifest internals. */
const char *rp_manifest_dir(const rpcplugin_manifest *m);
const char *rp_service_name(unsigned bit);

/* Runtime <-> loader.  A binding is one module instance's view of the
 * runtime: its host_ctx. */
typedef struct rp_binding rp_binding;
rp_binding *rp_runtime_bind(rpcplugin_runtime *rt, rpcplugin_module *mod);
/* Remove every route of the binding and wait until no handler call into it
 * is running. */
void rp_runtime_unroute(rp_binding *b);
void rp_runtime_unbind(rp_binding *b);
/* A swap's new binding: its routes wait until rp_runtime_commit_routes,
 * which moves every route of old (may be NULL) to b and waits until no
 * handler call into old runs; returns the routes moved. */
void rp_runtime_stage(rp_binding *b);
size_t rp_runtime_commit_routes(rp_binding *old, rp_binding *b);
/* 1 when a module of rt has the file (dev, ino) loaded. */
#include <sys/types.h>
int rp_runtime_file_loaded(rpcplugin_runtime *rt, dev_t dev, ino_t ino);
int rp_module_has_file(rpcplugin_module *mod, dev_t dev, ino_t ino);
int rp_runtime_on_poller(rpcplugin_runtime *rt);
/* 1 once the runtime drains or stops. */
int rp_runtime_stopping(rpcplugin_runtime *rt);
/* The binding's application calls: cancel them (no wait), then wait up to
 * timeout_ms for their handlers to finish them; returns those left. */
void rp_runtime_cancel_calls(rp_binding *b);
size_t rp_runtime_wait_calls(rp_binding *b, long timeout_ms);
/* client.c: a channel to what a broker advertisement names (TLS when
 * peer_pem is set), and one blocking unary call. */
grpc_channel *rp_client_channel(const char *network, const char *address,
                                const char *cert_pem, const char *key_pem,
                                const char *peer_pem);
int rp_unary_call(grpc_channel *channel, const char *method, const void *req,
                  size_t req_len, int timeout_ms, void *resp, size_t resp_cap,
                  size_t *resp_len, char *err, size_t errlen);
/* Descriptors the modules and the host added (for server reflection):
 * serialized FileDescriptorSets, each kept once, in the order added.  The
 * i-th, read under the runtime's lock; 0 past the last.  The bytes stay
 * valid until rpcplugin_runtime_destroy. */
int rp_runtime_descriptor_set_at(rpcplugin_runtime *rt, size_t i,
                                 const void **set, size_t *len);
/* reflection.c: fn(ud, "/pkg.Service/Method") for every method routed now
 * (a handler bound), under the runtime's lock: fn must not call into the
 * runtime. */
void rp_runtime_each_routed(rpcplugin_runtime *rt,
                            void (*fn)(void *ud, const char *path),
                            void *ud);
/* call.c: a new application call; the handler owns it. */
struct rp_callset;
void rp_app_call_start(struct rp_callset *set, const char *method, int kind,
                       rpcplugin_method_handler handler, void *handler_ctx,
                       grpc_call *call, grpc_byte_buffer *request,
                       gpr_timespec deadline);
void rp_runtime_fill_host_api(rp_binding *b, rpcplugin_host_api *api);
/* The runtime's multiplexer, or NULL (mux.h). */
struct rp_mux;
struct rp_mux *rp_runtime_mux(rpcplugin_runtime *rt);
int rp_runtime_started(const rpcplugin_runtime *rt);
/* Loader's list of modules, kept by the runtime for shutdown. */
void rp_runtime_add_module(rpcplugin_runtime *rt, rpcplugin_module *mod);
void rp_runtime_remove_module(rpcplugin_runtime *rt, rpcplugin_module *mod);
void rp_runtime_log(rpcplugin_runtime *rt, int level, const char *fmt, ...)
    RP_PRINTF(3, 4);
int rp_module_start(rpcplugin_module *mod);
/* Unroute and shut down (idempotent); the module stays loaded. */
int rp_module_shut(rpcplugin_module *mod);
int rp_module_is_shut(const rpcplugin_module *mod);
/* Shut down if needed, destroy, unbind, dlclose, free.  The runtime's
 * module list is not touched. */
void rp_module_free(rpcplugin_module *mod);

#endif
