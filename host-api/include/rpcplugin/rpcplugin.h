/*
 * rpcplugin.h - the ABI between a host and an rpcplugin module.
 *
 * An rpcplugin module is a shared object that implements go-plugin's
 * infrastructure services (plugin.GRPCBroker, plugin.GRPCStdio,
 * plugin.GRPCController and grpc.health.v1.Health) on gRPC's C core.  A host
 * loads it with dlopen (normally through the loader in <rpcplugin/host.h>),
 * and this header is the whole contract between the two.
 *
 * DESIGN
 *
 * 1. One exported symbol.  The module exports exactly one function,
 *    RPCPLUGIN_ENTRY_NAME, which takes no arguments, has no side effects and
 *    returns a pointer to a static, constant rpcplugin_module_api.  That
 *    struct starts with a fixed, padding-free header (magic, ABI major and
 *    minor, struct_size, build tag) that the loader checks before it calls
 *    anything else in the module (the PostgreSQL "magic block" habit).
 *
 * 2. Versioning.  A different ABI major is refused, naming both versions.
 *    Within one major, entries are only ever appended (the SQLite rule): a
 *    host calls an entry only when struct_size covers it and the pointer is
 *    not NULL (RPCPLUGIN_MODULE_HAS).  So a newer module works with an older
 *    host (the host ignores entries it does not know) and an older module
 *    works with a newer host (the host does not call what is not there).  The
 *    host API passed to the module follows the same rule in the other
 *    direction (RPCPLUGIN_HOST_HAS).
 *
 * 3. What outlives a module instance.  The gRPC C core fixes methods and
 *    completion queues at grpc_server_start, and a requested call can only be
 *    taken back by shutting the server down.  So the parts that must survive
 *    a module swap belong to the host side, not to the module:
 *      - the completion queue and the threads that poll it,
 *      - the method registrations (grpc_server_register_method),
 *      - the outstanding grpc_server_request_*_call requests, and the
 *        answer UNIMPLEMENTED for any method nobody serves.
 *    A module instance asks the host to route a method to it (add_method)
 *    and receives each new call through a handler.  From then on it owns
 *    that call: it starts batches on the host's completion queue with tags
 *    that begin with an rpcplugin_tag, and the host's poller calls the tag's
 *    on_done.  Swapping implementations on a live server is therefore:
 *    load the new module from its own file, init + register it (its
 *    add_method binds paths that are already registered), move the routes,
 *    shut the old instance down (it finishes or cancels only its own calls)
 *    and dlclose it.  HTTP/2 connections belong to the grpc_server and are
 *    never touched.  <rpcplugin/host.h> implements the host side.
 *
 * 4. Threads.  "Control thread" below means any one host thread that is
 *    not a completion-queue poller; the host serialises control calls
 *    (init, register_services, start, shutdown, destroy) for one instance.
 *    Handlers and tag callbacks run on the host's poller threads and never
 *    block.  put_line and the broker entries may be called from any host
 *    thread, concurrently.
 *
 * 5. Errors.  Every entry that can fail returns 0 or a negative
 *    RPCPLUGIN_E* code (rpcplugin_strerror names it); entries that can fail
 *    for a reason worth a sentence also fill a caller-owned buffer.  Memory
 *    never crosses the boundary to be freed on the other side.
 *
 * 6. Lifetime.  init -> register_services -> (grpc_server_start) -> start
 *    -> ... -> shutdown -> destroy -> dlclose.  shutdown is idempotent and
 *    returns only when no module thread runs and no tag of the module is
 *    pending on the completion queue, so dlclose right after destroy is
 *    safe.  The module never writes to stdout (the go-plugin handshake owns
 *    it), never exits or aborts on bad input, and pairs each grpc_init with a
 *    grpc_shutdown.
 */
#ifndef RPCPLUGIN_RPCPLUGIN_H
#define RPCPLUGIN_RPCPLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/grpc.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RPCPLUGIN_ABI_MAJOR 1
#define RPCPLUGIN_ABI_MINOR 3

/* "RPCP" read as a little-endian uint32. */
#define RPCPLUGIN_MODULE_MAGIC 0x50435052u

/* The one symbol a module exports. */
#define RPCPLUGIN_ENTRY_NAME "rpcplugin_module_entry"

/* Size of the build tag: facts that change the binary interface. */
#define RPCPLUGIN_ABI_TAG_SIZE 64

/* ---------------------------------------------------------------- errors */

/* X(name, value, description).  Values are stable within an ABI major. */
#define RPCPLUGIN_ERRNO_MAP(X)                                               \
  X(OK, 0, "success")                                                        \
  X(EINVAL, -1, "invalid argument")                                          \
  X(ENOMEM, -2, "out of memory")                                             \
  X(ENOENT, -3, "no such file")                                              \
  X(EABI, -4, "incompatible module ABI")                                     \
  X(ENOSYM, -5, "entry symbol not found")                                    \
  X(EMANIFEST, -6, "invalid manifest")                                       \
  X(ECONFIG, -7, "invalid module configuration")                             \
  X(ESTATE, -8, "operation not valid in the current state")                  \
  X(ESHUTDOWN, -9, "already shut down")                                      \
  X(ETIMEDOUT, -10, "timed out")                                             \
  X(EDROPPED, -11, "queue full, data dropped")                               \
  X(EGRPC, -12, "gRPC core error")                                           \
  X(ELIMIT, -13, "configured limit reached")                                 \
  X(EEXIST, -14, "already exists")                                           \
  X(ENOTFOUND, -15, "not found")                                             \
  X(EDLOPEN, -16, "cannot load shared object")                               \
  X(EWRONGTHREAD, -17, "not allowed on a completion-queue thread")           \
  X(ETOOBIG, -18, "too large")                                               \
  X(EUNSUPPORTED, -19, "not supported by this module")                       \
  X(EIO, -20, "input/output error")                                          \
  X(EREFUSED, -21, "refused by policy")

enum rpcplugin_errno {
#define RPCPLUGIN_ERRNO_ENUM(name, value, text) RPCPLUGIN_##name = (value),
  RPCPLUGIN_ERRNO_MAP(RPCPLUGIN_ERRNO_ENUM)
#undef RPCPLUGIN_ERRNO_ENUM
};

/* ---------------------------------------------------------------- common */

/* go-plugin's StdioData.Channel values. */
enum rpcplugin_channel {
  RPCPLUGIN_STDOUT = 1,
  RPCPLUGIN_STDERR = 2
};

/* Log levels for rpcplugin_host_api.log. */
enum rpcplugin_log_level {
  RPCPLUGIN_LOG_ERROR = 0,
  RPCPLUGIN_LOG_WARN = 1,
  RPCPLUGIN_LOG_INFO = 2,
  RPCPLUGIN_LOG_DEBUG = 3
};

/* Streaming shape of a method; decides whether the host reads the request
 * message before handing the call over. */
enum rpcplugin_method_kind {
  RPCPLUGIN_UNARY = 0,            /* request read by the host */
  RPCPLUGIN_SERVER_STREAMING = 1, /* request read by the host */
  RPCPLUGIN_CLIENT_STREAMING = 2, /* handler reads messages itself */
  RPCPLUGIN_BIDI_STREAMING = 3    /* handler reads messages itself */
};

/*
 * Every tag given to the host's completion queue points at a struct that
 * begins with an rpcplugin_tag.  The host's poller calls on_done(tag, ok)
 * exactly once per completed operation, with ok as grpc_event.success.
 */
typedef struct rpcplugin_tag rpcplugin_tag;
struct rpcplugin_tag {
  void (*on_done)(rpcplugin_tag *self, int ok);
};

/*
 * A new call for a method a module routed to itself.  Runs on a poller
 * thread and must not block.  Ownership of `call` (one reference) and of
 * `request` (may be NULL; NULL for client/bidi streaming methods, and when
 * the client half-closed without a message) passes to the handler.
 */
typedef void (*rpcplugin_call_handler)(void *handler_ctx, grpc_call *call,
                                       grpc_byte_buffer *request,
                                       gpr_timespec deadline);

/* ------------------------------------------------- application calls */

/*
 * A call to a method of an application service (the service a go-plugin
 * client Dispenses and calls), served without the C core's batches and
 * tags.  ABI 1.1.  Messages are bytes: the plugin encodes and decodes them
 * itself (protobuf-c, or anything else).
 *
 * The handler receives the call on a poller thread and must not block.
 * It owns the call until it calls rpcplugin_call_finish, exactly once,
 * from any thread, now or later (after I/O of its own); the call must not
 * be touched afterwards.  Every other entry may be called from any thread
 * while the handler owns the call.  A call ends early when the client
 * cancels, its deadline passes or the plugin shuts down: then
 * rpcplugin_call_cancelled answers 1, the on_cancel callback runs, sends
 * fail with RPCPLUGIN_ESHUTDOWN, and the handler still calls finish (which
 * then only lets the call go).  At shutdown, calls still unfinished are
 * cancelled before the module's shutdown entry runs, and the module's
 * shutdown must finish every call it still holds before it returns.
 *
 *   unary, server streaming:  rpcplugin_call_request() is the request;
 *   client streaming, bidi:   rpcplugin_call_read() reads messages, one
 *                             read at a time, until end of stream.
 *   replies:  rpcplugin_call_send() queues a message (a unary method sends
 *             exactly one), rpcplugin_call_finish() ends the call with a
 *             gRPC status code and message after the queued messages.
 *
 * Backpressure: at most RPCPLUGIN_CALL_SEND_QUEUE_BYTES of messages wait
 * per call (a single larger message is accepted when none waits); beyond
 * that send returns RPCPLUGIN_ELIMIT, and an on_writable callback runs once
 * the refused message fits and at least half the queue is free.  Callbacks run on a poller thread, one at a
 * time per call, and must not block.
 */
typedef struct rpcplugin_call rpcplugin_call;
typedef struct rpcplugin_call_ops rpcplugin_call_ops;

struct rpcplugin_call {
  const rpcplugin_call_ops *ops;
  void *user; /* free for the handler: its per-call state */
};

/* A new call.  Poller thread; must not block. */
typedef void (*rpcplugin_method_handler)(void *handler_ctx,
                                         rpcplugin_call *call);
/* A read finished: status 1 with a message (data, len: valid during the
 * callback only), 0 at the end of the client's stream, or a negative
 * RPCPLUGIN_E* code when the call ended first. */
typedef void (*rpcplugin_read_cb)(rpcplugin_call *call, int status,
                                  const void *data, size_t len, void *ud);
typedef void (*rpcplugin_call_cb)(rpcplugin_call *call, void *ud);

#define RPCPLUGIN_CALL_SEND_QUEUE_BYTES (1u << 20)

struct rpcplugin_call_ops {
  uint32_t struct_size; /* sizeof(rpcplugin_call_ops) of the host */
  /* "/package.Service/Method" */
  const char *(*method)(rpcplugin_call *call);
  /* The request of a unary or server-streaming call (NULL and 0 for the
   * others, or when the client sent none). */
  const void *(*request)(rpcplugin_call *call, size_t *len);
  /* Milliseconds until the client's deadline, -1 when it set none. */
  int64_t (*time_left_ms)(rpcplugin_call *call);
  /* 1 once the call ended early (client cancel, deadline, shutdown). */
  int (*cancelled)(rpcplugin_call *call);
  /* Run cb once when the call ends early (at once if it already did). */
  int (*on_cancel)(rpcplugin_call *call, rpcplugin_call_cb cb, void *ud);
  /* Read the next message (client or bidi streaming); one at a time. */
  int (*read)(rpcplugin_call *call, rpcplugin_read_cb cb, void *ud);
  /* Queue a message (copied).  RPCPLUGIN_ELIMIT: queue full, try after
   * on_writable; RPCPLUGIN_ESHUTDOWN: the call ended; RPCPLUGIN_ESTATE:
   * after finish. */
  int (*send)(rpcplugin_call *call, const void *data, size_t len);
  /* Run cb once, when the message send last refused fits and at least
   * half the queue is free, or the queue is empty (at once if so). */
  int (*on_writable)(rpcplugin_call *call, rpcplugin_call_cb cb, void *ud);
  /* Bytes queued and not yet handed to the transport. */
  size_t (*send_queued)(rpcplugin_call *call);
  /* End the call with a grpc_status_code and a message (may be NULL)
   * after the queued messages; the handler lets go of the call. */
  int (*finish)(rpcplugin_call *call, int status, const char *message);
};

static inline const char *rpcplugin_call_method(rpcplugin_call *c) {
  return c->ops->method(c);
}
static inline const void *rpcplugin_call_request(rpcplugin_call *c,
                                                 size_t *len) {
  return c->ops->request(c, len);
}
static inline int64_t rpcplugin_call_time_left_ms(rpcplugin_call *c) {
  return c->ops->time_left_ms(c);
}
static inline int rpcplugin_call_cancelled(rpcplugin_call *c) {
  return c->ops->cancelled(c);
}
static inline int rpcplugin_call_on_cancel(rpcplugin_call *c,
                                           rpcplugin_call_cb cb, void *ud) {
  return c->ops->on_cancel(c, cb, ud);
}
static inline int rpcplugin_call_read(rpcplugin_call *c, rpcplugin_read_cb cb,
                                      void *ud) {
  return c->ops->read(c, cb, ud);
}
static inline int rpcplugin_call_send(rpcplugin_call *c, const void *data,
                                      size_t len) {
  return c->ops->send(c, data, len);
}
static inline int rpcplugin_call_on_writable(rpcplugin_call *c,
                                             rpcplugin_call_cb cb, void *ud) {
  return c->ops->on_writable(c, cb, ud);
}
static inline size_t rpcplugin_call_send_queued(rpcplugin_call *c) {
  return c->ops->send_queued(c);
}
static inline int rpcplugin_call_finish(rpcplugin_call *c, int status,
                                        const char *message) {
  return c->ops->finish(c, status, message);
}

/* -------------------------------------------------------------- relays */

/*
 * A relay (ABI 1.2) is a tag that belongs to the host, for the batches of a
 * long-lived stream that may move to another module instance at a swap.
 * The module gives &relay->tag to grpc_call_start_batch, points a
 * GRPC_OP_RECV_MESSAGE at &relay->recv_message and a
 * GRPC_OP_RECV_CLOSE_ON_SERVER at &relay->cancelled, and the host calls
 * target->on_done(target, ok) when the batch completes.  At a handover the
 * old instance detaches its relays (relay_retarget with NULL: it returns
 * once no callback into the old target runs; a completion that arrives
 * while detached is kept) and the new instance attaches its own targets
 * (a kept completion is then delivered at once, on the attaching thread).
 * A relay is freed (relay_free) by whoever owns it when no batch is pending
 * on it.
 */
typedef struct rpcplugin_relay {
  rpcplugin_tag tag;              /* the host's: give it to the C core */
  grpc_byte_buffer *recv_message; /* GRPC_OP_RECV_MESSAGE writes here */
  int cancelled;                  /* GRPC_OP_RECV_CLOSE_ON_SERVER writes here */
} rpcplugin_relay;

/* ------------------------------------------------------- host -> module */

/*
 * What the host gives the module at init.  The module copies what it
 * needs; the struct itself is valid only during init, but host_ctx, server
 * and cq stay valid until the module's destroy returns.
 */
typedef struct rpcplugin_host_api {
  uint16_t abi_major;   /* RPCPLUGIN_ABI_MAJOR of the host */
  uint16_t abi_minor;   /* RPCPLUGIN_ABI_MINOR of the host */
  uint32_t struct_size; /* sizeof(rpcplugin_host_api) as the host knows it */

  /* Opaque; passed back on every upcall.  One per module instance. */
  void *host_ctx;

  /* The host's server and the completion queue registered on it.  The
   * module starts every batch and connectivity watch on `cq`. */
  grpc_server *server;
  grpc_completion_queue *cq;

  /*
   * Route a method to the module.  Control thread, during
   * register_services.  kind is an rpcplugin_method_kind.  Fails with
   * RPCPLUGIN_ESTATE when the server already started and the path was
   * never registered, RPCPLUGIN_EEXIST when another instance serves it.
   * On failure a sentence is written to err.
   */
  int (*add_method)(void *host_ctx, const char *path, int kind,
                    rpcplugin_call_handler handler, void *handler_ctx,
                    char *err, size_t errlen);

  /*
   * The client asked the plugin to shut down (GRPCController.Shutdown, after
   * the reply went out).  Runs on a poller thread; the host must only take
   * note and run its shutdown path from a control thread.
   */
  void (*request_shutdown)(void *host_ctx);

  /* Optional (may be NULL).  Any thread.  msg is NUL-terminated, without a
   * trailing newline, and valid only during the call. */
  void (*log)(void *host_ctx, int level, const char *msg);

  /* Nonzero when the calling thread is one of the host's pollers: blocking
   * entries use it to refuse, with RPCPLUGIN_EWRONGTHREAD, a wait that
   * could never end. */
  int (*on_poller_thread)(void *host_ctx);

  /* ABI 1.1.  Route a method of an application service to the module,
   * served through rpcplugin_call (see "application calls" above).  Same
   * rules and errors as add_method. */
  int (*add_call_method)(void *host_ctx, const char *path, int kind,
                         rpcplugin_method_handler handler, void *handler_ctx,
                         char *err, size_t errlen);

  /* ABI 1.1.  With go-plugin's AutoMTLS, the TLS of the plugin's listener,
   * as PEM: its certificate and key, and the client's certificate, the only
   * one to trust.  Connections the plugin makes to the client (broker
   * subchannels and dials) present tls_cert_pem, trust only
   * tls_peer_cert_pem and expect the server name "localhost".  All three
   * NULL without AutoMTLS.  Valid until the module's destroy returns. */
  const char *tls_cert_pem;
  const char *tls_key_pem;
  const char *tls_peer_cert_pem;

  /* ABI 1.1.  Describe the module's services for server reflection: one or
   * more serialized google.protobuf.FileDescriptorProto, as a serialized
   * google.protobuf.FileDescriptorSet (protoc --descriptor_set_out
   * --include_imports).  Control thread, during register_services.  The
   * bytes are copied.  May be NULL (no reflection in this host). */
  int (*add_descriptors)(void *host_ctx, const void *descriptor_set,
                         size_t len, char *err, size_t errlen);

  /* ABI 1.1.  go-plugin's GRPCBroker.Dial for an application module: wait
   * up to timeout_ms (< 0: until shutdown) for the client's advertisement
   * of service_id on the infrastructure module's broker, and open a
   * channel to it (TLS as above under AutoMTLS).  Any thread but a
   * poller (RPCPLUGIN_EWRONGTHREAD).  The channel is the caller's: release
   * it with broker_release, before the module's shutdown returns.  May be
   * NULL (RPCPLUGIN_HOST_HAS), and fails with RPCPLUGIN_EUNSUPPORTED when no
   * loaded module serves plugin.GRPCBroker. */
  int (*broker_dial)(void *host_ctx, uint32_t service_id, int timeout_ms,
                     grpc_channel **out, char *err, size_t errlen);
  void (*broker_release)(void *host_ctx, grpc_channel *channel);

  /* ABI 1.1.  One unary call on a channel (from broker_dial, or the
   * module's own), blocking: any thread but a poller
   * (RPCPLUGIN_EWRONGTHREAD).  method is "/package.Service/Method".  The
   * reply goes to resp (resp_cap bytes; RPCPLUGIN_ETOOBIG when larger) and
   * its length to *resp_len.  A status other than OK is RPCPLUGIN_EGRPC
   * with "METHOD: status N: message" in err.  timeout_ms <= 0: no
   * deadline. */
  int (*unary_call)(void *host_ctx, grpc_channel *channel, const char *method,
                    const void *req, size_t req_len, int timeout_ms,
                    void *resp, size_t resp_cap, size_t *resp_len, char *err,
                    size_t errlen);

  /* ABI 1.2.  Relays (see "relays" above).  Any thread; relay_retarget
   * with NULL must not be called from the target's own callback. */
  rpcplugin_relay *(*relay_new)(void *host_ctx, rpcplugin_tag *target);
  void (*relay_retarget)(void *host_ctx, rpcplugin_relay *relay,
                         rpcplugin_tag *target);
  void (*relay_free)(void *host_ctx, rpcplugin_relay *relay);

  /* ABI 1.3.  go-plugin's gRPC broker multiplexing: the client sent
   * knock{knock:true} for service_id on plugin.GRPCBroker/StartStream (its
   * Dial of a service the host brokered).  0: the client's next stream
   * goes to that service; the broker answers knock{knock:true, ack:true}.
   * Otherwise the reason is in err, and the broker answers it as the ack's
   * error.  RPCPLUGIN_EUNSUPPORTED: the host does not multiplex (the
   * broker handles the knock as without).  Any thread; does not block. */
  int (*broker_mux_knock)(void *host_ctx, uint32_t service_id, char *err,
                          size_t errlen);
} rpcplugin_host_api;

/* --------------------------------------------------------------- stats */

/* Counters of an instance; the caller sets struct_size, the module fills
 * the fields it knows and leaves the rest untouched. */
typedef struct rpcplugin_stats {
  uint32_t struct_size;
  uint32_t reserved;
  /* stdio */
  uint64_t stdio_queued_chunks;  /* accepted by put_line */
  uint64_t stdio_queued_bytes;
  uint64_t stdio_sent_chunks;    /* handed to a stream, completely */
  uint64_t stdio_sent_bytes;
  uint64_t stdio_sent_messages;  /* StdioData messages written */
  uint64_t stdio_dropped_chunks; /* dropped by drop_oldest / drop_newest */
  uint64_t stdio_dropped_bytes;
  uint64_t stdio_queue_bytes;    /* bytes waiting now */
  uint64_t stdio_blocked_puts;   /* put_line calls that had to wait */
  uint64_t stdio_timed_out_puts; /* ...and gave up at their timeout */
  /* broker */
  uint64_t broker_streams;       /* StartStream calls open now */
  uint64_t broker_subchannels;   /* subchannels open now */
  uint64_t broker_messages_in;
  uint64_t broker_messages_out;
  uint64_t broker_errors;        /* error replies sent */
  /* calls */
  uint64_t calls_active;
  uint64_t calls_total;
  /* stdio, continued */
  uint64_t stdio_resent_messages; /* writes that failed and were put back */
} rpcplugin_stats;

/* --------------------------------------------------------- broker types */

/* A peer's advertisement (go-plugin's Accept on the other side). */
typedef struct rpcplugin_conn_info {
  uint32_t service_id;
  char network[16];  /* "unix" or "tcp" */
  char address[256]; /* NUL-terminated */
} rpcplugin_conn_info;

/* ------------------------------------------------------------ handover */

/*
 * At a swap (ABI 1.2), the old instance hands what a client must not lose
 * to the new one: its open streams with their pending batches (as relays),
 * the output it queued and did not send, and what its broker learned.  The
 * old instance owns the memory until its handover_done.
 */
typedef struct rpcplugin_handover_stream {
  const char *method;     /* "/plugin.GRPCStdio/StreamStdio", ... */
  grpc_call *call;        /* one reference, passed on */
  rpcplugin_relay *send;  /* a send batch in flight (detached), or NULL */
  rpcplugin_relay *recv;  /* a receive in flight, or NULL */
  rpcplugin_relay *close; /* the RECV_CLOSE_ON_SERVER watch, or NULL */
  int metadata_sent;      /* initial metadata went out */
  int recv_ended;         /* the client half-closed */
  /* Messages this stream took and did not see sent, in order, each as a
   * 4-byte little-endian length and the serialized message; the first is
   * the one in flight when send is not NULL (to be sent again if that send
   * fails). */
  const void *unsent;
  size_t unsent_len;
} rpcplugin_handover_stream;

typedef struct rpcplugin_handover {
  uint32_t struct_size; /* set by the host */
  rpcplugin_handover_stream *streams;
  size_t nstreams;
  /* GRPCStdio output queued and taken by no stream, in order: records of
   * channel (1 byte), length (4 bytes little-endian) and the bytes. */
  const void *stdio;
  size_t stdio_len;
  /* GRPCBroker: the peer's advertisements received, and the host's own
   * (broker_advertise), to be sent on streams opened later. */
  const rpcplugin_conn_info *peer_adverts;
  size_t npeer_adverts;
  const rpcplugin_conn_info *host_adverts;
  size_t nhost_adverts;
} rpcplugin_handover;

/* ------------------------------------------------------- module -> host */

/*
 * The module's descriptor and vtable.  Entries below the header are called
 * only after the loader checked the header.  Instance pointers come from
 * init and are passed back to every entry.
 */
typedef struct rpcplugin_module_api {
  /* Header: fixed layout for every ABI major, no padding. */
  uint32_t magic;     /* RPCPLUGIN_MODULE_MAGIC */
  uint16_t abi_major; /* RPCPLUGIN_ABI_MAJOR the module was built with */
  uint16_t abi_minor;
  uint32_t struct_size; /* sizeof(rpcplugin_module_api) in the module */
  uint32_t flags;       /* reserved, 0 */
  /* Build facts that must match the host's: CPU, data model and the gRPC
   * core the module linked against.  See RPCPLUGIN_ABI_TAG. */
  char abi_tag[RPCPLUGIN_ABI_TAG_SIZE];

  /* Static strings, for logs. */
  const char *name;
  const char *version;

  /*
   * Create an instance.  Control thread.  config_json is the manifest's
   * "config" object as JSON text ("{}" when absent); the module validates
   * it and, on failure, writes "<field>: expected <what>, got <what>" to
   * err and returns RPCPLUGIN_ECONFIG.  On success *instance is set.
   */
  int (*init)(const rpcplugin_host_api *host, const char *config_json,
              void **instance, char *err, size_t errlen);

  /*
   * Route the methods of the named services to this instance through
   * host->add_method.  Control thread, before or (for a swap) after
   * grpc_server_start.  services are the manifest's names; an unknown name
   * fails with RPCPLUGIN_EINVAL.
   */
  int (*register_services)(void *instance, const char *const *services,
                           size_t n_services, char *err, size_t errlen);

  /* The server is started: begin serving.  Control thread. */
  int (*start)(void *instance);

  /*
   * Queue one chunk of output for StreamStdio.  Any host thread, never a
   * poller.  Bytes are opaque.  Returns 0, RPCPLUGIN_EDROPPED
   * (drop_newest dropped this chunk), RPCPLUGIN_ETIMEDOUT (block policy
   * with a timeout), RPCPLUGIN_ESHUTDOWN, RPCPLUGIN_EUNSUPPORTED (stdio not
   * enabled) or RPCPLUGIN_EINVAL.
   */
  int (*put_line)(void *instance, int channel, const void *data, size_t len);

  /*
   * Stop: flush stdio streams (bounded by the configured deadline), finish
   * them with OK, cancel every other call of this instance, close broker
   * subchannels, and wait until every tag of the instance came back.
   * Control thread.  Idempotent.  Returns RPCPLUGIN_EWRONGTHREAD when
   * called on a poller thread.
   */
  int (*shutdown)(void *instance);

  /* Free the instance.  After shutdown; control thread. */
  void (*destroy)(void *instance);

  /* Read counters.  Any thread. */
  int (*get_stats)(void *instance, rpcplugin_stats *out);

  /*
   * Broker, for the host.  Any host thread, never a poller.  timeout_ms < 0
   * waits until shutdown.  Each returns RPCPLUGIN_EUNSUPPORTED when the
   * broker is not enabled.
   *
   * broker_advertise: tell the peer the host serves service_id at
   *   network/address (ConnInfo without knock on every open StartStream,
   *   as go-plugin's Accept does); RPCPLUGIN_ENOTFOUND when no stream is
   *   open.
   * broker_wait_advertised: wait for the peer's advertisement of
   *   service_id (go-plugin's Dial) and copy it to *out.
   * broker_knock: send knock{knock:true} for service_id/network/address and
   *   wait for the peer's ack; a negative ack is RPCPLUGIN_EREFUSED with the
   *   peer's reason in err.
   * broker_channel: borrow the grpc_channel of an open subchannel; it stays
   *   valid until broker_release_channel, even if the subchannel is closed
   *   meanwhile.
   */
  int (*broker_advertise)(void *instance, uint32_t service_id,
                          const char *network, const char *address);
  int (*broker_wait_advertised)(void *instance, uint32_t service_id,
                                int timeout_ms, rpcplugin_conn_info *out);
  int (*broker_knock)(void *instance, uint32_t service_id,
                      const char *network, const char *address,
                      int timeout_ms, char *err, size_t errlen);
  int (*broker_channel)(void *instance, uint32_t service_id,
                        grpc_channel **out);
  void (*broker_release_channel)(void *instance, grpc_channel *channel);

  /*
   * ABI 1.2: a swap.  Control thread.  The host already routes new calls
   * and host threads to the new instance.  handover_out: close the output
   * queue to producers (put_line callers inside it return
   * RPCPLUGIN_ESHUTDOWN and the host sends their chunk again to the new
   * instance), stop every open stream without ending it and describe it in
   * *out.  handover_in (on the new instance, started): take the streams
   * over (each call reference, each relay, each unsent message) and put the
   * queued output before anything of its own; whatever it cannot take it
   * ends itself.  handover_done (old instance): free what handover_out
   * described; its shutdown follows.
   */
  int (*handover_out)(void *instance, rpcplugin_handover *out);
  int (*handover_in)(void *instance, const rpcplugin_handover *h, char *err,
                     size_t errlen);
  void (*handover_done)(void *instance, rpcplugin_handover *h);
} rpcplugin_module_api;

/* Size of the header every ABI major shares. */
#define RPCPLUGIN_MODULE_HEADER_SIZE (16 + RPCPLUGIN_ABI_TAG_SIZE)

/* Smallest struct_size an ABI 1.x module may declare: up to get_stats. */
#define RPCPLUGIN_MODULE_MIN_SIZE                                            \
  (offsetof(rpcplugin_module_api, get_stats) +                               \
   sizeof(((rpcplugin_module_api *)0)->get_stats))

/* True when entry `field` of `api` exists and may be called. */
#define RPCPLUGIN_MODULE_HAS(api, field)                                     \
  (offsetof(rpcplugin_module_api, field) + sizeof((api)->field) <=           \
       (size_t)(api)->struct_size &&                                         \
   (api)->field != NULL)

#define RPCPLUGIN_HOST_HAS(host, field)                                      \
  (offsetof(rpcplugin_host_api, field) + sizeof((host)->field) <=            \
       (size_t)(host)->struct_size &&                                        \
   (host)->field != NULL)

/* The entry's type, and its declaration for modules (hosts look it up with
 * dlsym and never link against it). */
typedef const rpcplugin_module_api *(*rpcplugin_module_entry_fn)(void);
const rpcplugin_module_api *rpcplugin_module_entry(void);

/*
 * Build tag: what must be equal on both sides.  RPCPLUGIN_GRPC_CORE_VERSION
 * is set by the build from pkg-config (the C core's version, which names
 * its SONAME); a module and a host built against different cores would pass
 * each other grpc_server pointers of different layouts.
 */
#ifndef RPCPLUGIN_GRPC_CORE_VERSION
#define RPCPLUGIN_GRPC_CORE_VERSION "unknown"
#endif
#if defined(__x86_64__)
#define RPCPLUGIN_ARCH_ "x86_64"
#elif defined(__aarch64__)
#define RPCPLUGIN_ARCH_ "aarch64"
#else
#define RPCPLUGIN_ARCH_ "other"
#endif
#define RPCPLUGIN_STR2_(x) #x
#define RPCPLUGIN_STR_(x) RPCPLUGIN_STR2_(x)
#define RPCPLUGIN_ABI_TAG                                                    \
  RPCPLUGIN_ARCH_ "-ptr" RPCPLUGIN_STR_(__SIZEOF_POINTER__)                  \
                  ";grpc-core " RPCPLUGIN_GRPC_CORE_VERSION

#ifdef __cplusplus
}
#endif

#endif /* RPCPLUGIN_RPCPLUGIN_H */
