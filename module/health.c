/*
 * health.c - grpc.health.v1.Health/Check: SERVING for "" and "plugin"
 * (go-plugin's Ping), status NOT_FOUND for any other name, as the standard
 * health servers answer.
 */
#include <string.h>

#include "codec.h"
#include "engine.h"
#include "health.pb-c.h"

static void check_call(rp_instance *inst, grpc_call *call,
                       grpc_byte_buffer *req) {
  Grpc__Health__V1__HealthCheckRequest *r =
      (Grpc__Health__V1__HealthCheckRequest *)rp_decode(
          &grpc__health__v1__health_check_request__descriptor, req);
  Grpc__Health__V1__HealthCheckResponse resp =
      GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  if (req) grpc_byte_buffer_destroy(req);
  if (r == NULL) {
    rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_INVALID_ARGUMENT,
                   "cannot decode grpc.health.v1.HealthCheckRequest", NULL,
                   NULL);
    return;
  }
  if (r->service[0] == '\0' || strcmp(r->service, "plugin") == 0) {
    resp.status =
        GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_OK, NULL, rp_encode(&resp.base),
                   NULL);
  } else {
    rp_unary_reply(&inst->calls, inst, call, GRPC_STATUS_NOT_FOUND, "unknown service", NULL,
                   NULL);
  }
  rp_msg_free(&r->base);
}

static const rp_method_def methods[] = {
    {"/grpc.health.v1.Health/Check", RPCPLUGIN_UNARY, check_call},
};

const rp_service rp_health_service = {
    .name = "grpc.health.v1.Health",
    .methods = methods,
    .nmethods = 1,
};
