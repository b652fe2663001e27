/*
 * callengine.h - the call engine: per-call state, tags, cancellation and
 * drain, written once.  The module's services (module/) and librpcplugin's
 * call API for application services (host-api/call.c) both build on it; it
 * is compiled into each, as jsonfield.c is.
 *
 * A call (rp_call) wraps one grpc_call.  It belongs to a call set (the
 * calls of one module instance, or of one binding of the runtime) and to
 * an owner, the service state its callbacks reach through c->inst (of type
 * RP_CALL_OWNER, which a user of this header may define first).  It is
 * reference counted: the service holds one reference, and every batch in
 * flight holds one, released after its callback ran.  When the count drops
 * to zero the call leaves its set, its grpc_call is released and, if the
 * set is draining, the drain is woken.
 *
 * The C core allows one send and one receive in flight per call; the
 * engine keeps one op slot for each (send, recv) plus one for the final
 * status and one for the close watch, and refuses (RPCPLUGIN_ESTATE) a
 * second op in a busy slot.  Callbacks run on a poller thread.
 */
#ifndef RPCPLUGIN_CALLENGINE_H
#define RPCPLUGIN_CALLENGINE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#include <rpcplugin/rpcplugin.h>

#ifndef RP_CALL_OWNER
#define RP_CALL_OWNER void
#endif

typedef struct rp_call rp_call;

/* The calls of one owner: shutdown cancels them and waits for the last. */
typedef struct rp_callset {
  pthread_mutex_t mu; /* calls, ncalls, cancelling */
  pthread_cond_t cv;  /* ncalls reached 0 */
  rp_call *calls;     /* live calls, doubly linked */
  size_t ncalls;
  int cancelling; /* every remaining and new call is cancelled */
  atomic_uint_fast64_t total;
  /* Optional log sink (any thread). */
  void (*log)(void *ctx, int level, const char *msg);
  void *log_ctx;
} rp_callset;

void rp_callset_init(rp_callset *set,
                     void (*log)(void *ctx, int level, const char *msg),
                     void *log_ctx);
void rp_callset_destroy(rp_callset *set);
/* Calls alive now. */
size_t rp_callset_count(rp_callset *set);

typedef void (*rp_call_cb)(rp_call *c, int ok);

typedef struct rp_op {
  rpcplugin_tag tag; /* first: the poller casts the tag to rp_op */
  rp_call *call;
  rp_call_cb cb;
  atomic_int busy;
  rpcplugin_relay *relay; /* the host's tag for this slot, or NULL */
  int handed_in; /* a batch that came over in a handover: its callback is
                    the one rp_call_resume gives */
} rp_op;

struct rp_call {
  rp_callset *set;
  RP_CALL_OWNER *inst; /* the owner, for the service's callbacks */
  grpc_call *call;
  atomic_int refs;
  void *svc;                   /* service state, freed with the call */

  rp_op send_op, recv_op, finish_op, close_op;
  int md_sent;
  int cancelled;               /* set when close_op completes */
  grpc_byte_buffer *send_buf;   /* owned until send_op completes */
  grpc_byte_buffer *finish_buf; /* owned until finish_op completes */
  grpc_byte_buffer *recv_buf;   /* result of recv; the callback takes it */
  grpc_slice status_details;
  int has_details;

  rp_call *prev, *next; /* the set's list, under set->mu */
  /* With relays (host API 1.2): the host that made them. */
  const rpcplugin_host_api *host;
  /* Optional: runs when the last reference goes, before the memory is
   * freed (the service frees what its state holds). */
  void (*on_free)(rp_call *c);
};

/* Adopt a call into set, for owner (takes the caller's grpc_call
 * reference).  The returned call has one reference, the caller's.  svc_size
 * bytes of zeroed service state follow at c->svc.  NULL on out of memory
 * (the grpc_call is then cancelled and released).  A call adopted while the
 * set cancels is cancelled at once. */
rp_call *rp_call_adopt(rp_callset *set, RP_CALL_OWNER *owner, grpc_call *call,
                       size_t svc_size);
void rp_call_ref(rp_call *c);
void rp_call_unref(rp_call *c);

/* Route this call's send, receive and close batches through relays of the
 * host (host API 1.2), so that a swap can hand it to another instance.
 * Before the first batch.  0, or RPCPLUGIN_EUNSUPPORTED / ENOMEM (the call
 * then goes on without relays). */
int rp_call_use_relays(rp_call *c, const rpcplugin_host_api *host);

/* A call handed over: what the old owner gives away and the new one takes
 * (rpcplugin_handover_stream's call and relays). */
typedef struct rp_call_handoff {
  grpc_call *call;
  rpcplugin_relay *send, *recv, *close; /* pending batches, detached */
  int md_sent;
} rp_call_handoff;
/* Give the call away: detach its relays (waits until no callback of this
 * call runs), forget its pending batches and hand the grpc_call reference
 * and the pending relays to *out.  Control thread; the caller still holds
 * its own reference, and releases it as usual (no callback runs any more,
 * the grpc_call is not cancelled).  RPCPLUGIN_ESTATE without relays or with
 * a finish in flight. */
int rp_call_export(rp_call *c, rp_call_handoff *out);
/* Take a call handed over (one stream of an rpcplugin_handover): like
 * rp_call_adopt, with the pending batches of hs (each holds a reference of
 * the call, as a batch started here would).
 * Nothing runs until rp_call_resume attaches the relays with the
 * callbacks for the pending send, receive and close batches (a completion
 * that came meanwhile is delivered then, on the calling thread).  A batch
 * the service starts in between (a producer's write to a stream it just
 * listed) keeps its own callback; its completion too waits for the
 * resume. */
rp_call *rp_call_import(rp_callset *set, RP_CALL_OWNER *owner,
                        const rpcplugin_host_api *host,
                        const rpcplugin_handover_stream *hs,
                        size_t svc_size);
void rp_call_resume(rp_call *c, rp_call_cb send_cb, rp_call_cb recv_cb,
                    rp_call_cb close_cb);

/* Watch for the end of the call (RECV_CLOSE_ON_SERVER); cb sees
 * c->cancelled.  Use on streaming calls that finish later. */
int rp_call_watch_close(rp_call *c, rp_call_cb cb);
/* Send one message; initial metadata goes with the first.  Takes bb only on
 * success (the caller keeps it on error).  Note that the C core moves the
 * slices out of bb when the batch starts. */
int rp_call_send(rp_call *c, grpc_byte_buffer *bb, uint32_t flags,
                 rp_call_cb cb);
/* Send initial metadata alone, in the send slot (a stream that has nothing
 * to say yet still tells the client it is open). */
int rp_call_send_metadata(rp_call *c, rp_call_cb cb);
/* Receive one message into c->recv_buf (NULL at end of stream). */
int rp_call_recv(rp_call *c, rp_call_cb cb);
/* Final status, optionally with a last message (taken) and the close
 * watch in the same batch (for unary calls). */
int rp_call_finish(rp_call *c, grpc_status_code status, const char *details,
                   grpc_byte_buffer *msg, int with_close, rp_call_cb cb);
void rp_call_cancel(rp_call *c, grpc_status_code status, const char *details);

/* Answer a unary call in one batch and release it; cb (may be NULL) runs
 * when the reply went out or failed.  Takes call and msg. */
void rp_unary_reply(rp_callset *set, RP_CALL_OWNER *owner, grpc_call *call,
                    grpc_status_code status, const char *details,
                    grpc_byte_buffer *msg, rp_call_cb cb);

/* Cancel every live call of the set and wait (control thread) until none
 * is left.  Calls adopted later are cancelled at once.  A call whose
 * status is already on its way is given up to a second to deliver it
 * before it is cancelled too. */
void rp_callset_cancel_and_drain(rp_callset *set);
/* The same in two steps: cancel without waiting, then wait up to
 * timeout_ms (< 0: as long as it takes); returns the calls still alive. */
void rp_callset_cancel(rp_callset *set);
size_t rp_callset_wait(rp_callset *set, long timeout_ms);

/* The bytes of a received message, as one slice (the caller unrefs it). */
grpc_slice rp_flatten(grpc_byte_buffer *bb);

#endif
