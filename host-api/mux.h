/*
 * mux.h - go-plugin's gRPC broker multiplexing (PLUGIN_MULTIPLEX_GRPC), the
 * plugin's side: one connection, a yamux server session on it, and each
 * yamux stream bridged byte for byte to a local socket.  Internal to
 * librpcplugin (the public API is in host.h: rpcplugin_runtime_multiplex
 * and friends).
 *
 * Why a byte bridge: gRPC 1.51's *_from_fd functions take insecure
 * credentials only, and with AutoMTLS each yamux stream carries its own
 * TLS (as go-plugin's).  So the main server also listens on a unix socket
 * in a private directory, with the same credentials as its public
 * listener would have, and each stream the client opens becomes one
 * connection to it (or to the address a brokered service was advertised
 * at); each plugin dial becomes a connection of its channel to a unix
 * socket of ours, which the mux turns into knock, ack, new yamux stream.
 * TLS stays inside the C core, end to end.
 */
#ifndef RPCPLUGIN_MUX_H
#define RPCPLUGIN_MUX_H

#include <stddef.h>
#include <stdint.h>

#include <rpcplugin/host.h>

typedef struct rp_mux rp_mux;

/* Knock for a plugin dial: send knock{knock:true} for id and wait for the
 * peer's ack (0), or fail (err filled). */
typedef int (*rp_mux_knock_fn)(void *ud, uint32_t id, char *err,
                               size_t errlen);

/* knock and log (used when o->log is NULL) get knock_ud. */
int rp_mux_start(const rpcplugin_mux_options *o, rp_mux_knock_fn knock,
                 void (*log)(void *ud, int level, const char *msg),
                 void *knock_ud, rp_mux **out, rpcplugin_error *err);
/* Start the threads (after rp_mux_start, once the mux is where the
 * runtime's broker_mux_knock finds it: the first stream may carry a knock
 * at once).  On failure the session is over (on_end was called);
 * rp_mux_free still follows. */
int rp_mux_run(rp_mux *m, rpcplugin_error *err);
/* The client knocked for id (its Dial of a service the host brokered):
 * the next stream it opens goes to id's route.  0, or an error with the
 * reason in err (no route for id, too many knocks pending). */
int rp_mux_accept_knock(rp_mux *m, uint32_t id, char *err, size_t errlen);
/* Where a channel for a plugin dial of id connects ("unix:PATH"). */
int rp_mux_dial_target(rp_mux *m, uint32_t id, char *target, size_t len,
                       rpcplugin_error *err);
int rp_mux_route(rp_mux *m, uint32_t id, const char *network,
                 const char *address);
void rp_mux_go_away(rp_mux *m);
/* Stop: forward what the local sides still have (up to flush_ms), close
 * the connection, join the threads.  Idempotent. */
void rp_mux_stop(rp_mux *m, int flush_ms);
void rp_mux_free(rp_mux *m);
void rp_mux_get_stats(rp_mux *m, rpcplugin_mux_stats *st);

#endif
