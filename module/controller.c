/*
 * controller.c - plugin.GRPCController/Shutdown.
 *
 * Reply plugin.Empty first; only when that batch is done (the reply is with
 * the transport) tell the host, once, that the client asked to shut down.
 * A second or concurrent Shutdown gets its Empty too and changes nothing.
 */
#include "codec.h"
#include "engine.h"
#include "grpc_controller.pb-c.h"

static void replied(rp_call *c, int ok) {
  rp_instance *inst = c->inst;
  (void)ok; /* the client asked, even if it left before the reply */
  if (atomic_exchange(&inst->shutdown_fired, 1) == 0)
    inst->host.request_shutdown(inst->host.host_ctx);
}

static void shutdown_call(rp_instance *inst, grpc_call *call,
                          grpc_byte_buffer *req) {
  Plugin__Empty reply = PLUGIN__EMPTY__INIT;
  ProtobufCMessage *m = rp_decode(&plugin__empty__descriptor, req);
  if (req) grpc_byte_buffer_destroy(req);
  if (m == NULL) {
    rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_INVALID_ARGUMENT,
                   "cannot decode plugin.Empty", NULL, NULL);
    return;
  }
  rp_msg_free(m);
  rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_OK, NULL,
                 rp_encode(&reply.base), replied);
}

static const rp_method_def methods[] = {
    {"/plugin.GRPCController/Shutdown", RPCPLUGIN_UNARY, shutdown_call},
};

const rp_service rp_controller_service = {
    .name = "plugin.GRPCController",
    .methods = methods,
    .nmethods = 1,
};
