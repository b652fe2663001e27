/*
 * client.c - what an application module needs to call the client back:
 * go-plugin's GRPCBroker.Dial (wait for the client's advertisement on the
 * infrastructure module's broker, open a channel to it, with AutoMTLS's
 * TLS when it is on) and one blocking unary call.  rpcplugin_host_api's
 * broker_dial, broker_release and unary_call (ABI 1.1).
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "callengine.h"

grpc_channel *rp_client_channel(const char *network, const char *address,
                                const char *cert_pem, const char *key_pem,
                                const char *peer_pem) {
  char target[300];
  grpc_channel_credentials *creds;
  grpc_channel *ch;
  grpc_arg args[2];
  grpc_channel_args cargs = {0, args};
  if (strcmp(network, "unix") == 0)
    snprintf(target, sizeof target, "unix:%s", address);
  else
    snprintf(target, sizeof target, "%s", address);
  /* A private subchannel pool: one connection per dial, as go-plugin's. */
  args[cargs.num_args].type = GRPC_ARG_INTEGER;
  args[cargs.num_args].key = GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL;
  args[cargs.num_args++].value.integer = 1;
  if (peer_pem) {
    grpc_ssl_pem_key_cert_pair pair = {key_pem, cert_pem};
    creds = grpc_ssl_credentials_create(peer_pem, cert_pem ? &pair : NULL,
                                        NULL, NULL);
    args[cargs.num_args].type = GRPC_ARG_STRING;
    args[cargs.num_args].key = GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[cargs.num_args++].value.string = "localhost";
  } else {
    creds = grpc_insecure_credentials_create();
  }
  if (creds == NULL) return NULL;
  ch = grpc_channel_create(target, creds, &cargs);
  grpc_channel_credentials_release(creds);
  return ch;
}

int rp_unary_call(grpc_channel *channel, const char *method, const void *req,
                  size_t req_len, int timeout_ms, void *resp, size_t resp_cap,
                  size_t *resp_len, char *err, size_t errlen) {
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_slice mslice = grpc_slice_from_copied_string(method);
  gpr_timespec deadline =
      timeout_ms > 0 ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                    gpr_time_from_millis(timeout_ms,
                                                         GPR_TIMESPAN))
                     : gpr_inf_future(GPR_CLOCK_MONOTONIC);
  grpc_call *call;
  grpc_op ops[6];
  grpc_metadata_array md_in, trailing;
  grpc_byte_buffer *out = NULL, *in = NULL;
  grpc_status_code status = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice(), s;
  grpc_event ev;
  int rc = 0;

  if (err && errlen) err[0] = '\0';
  if (resp_len) *resp_len = 0;
  call = grpc_channel_create_call(channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                  mslice, NULL, deadline, NULL);
  grpc_slice_unref(mslice);
  if (call == NULL) {
    grpc_completion_queue_shutdown(cq);
    grpc_completion_queue_destroy(cq);
    return RPCPLUGIN_EGRPC;
  }
  s = grpc_slice_from_copied_buffer(req, req_len);
  out = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  grpc_metadata_array_init(&md_in);
  grpc_metadata_array_init(&trailing);
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = out;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &md_in;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &in;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing;
  ops[5].data.recv_status_on_client.status = &status;
  ops[5].data.recv_status_on_client.status_details = &details;
  if (grpc_call_start_batch(call, ops, 6, call, NULL) != GRPC_CALL_OK) {
    rc = RPCPLUGIN_EGRPC;
    if (err) snprintf(err, errlen, "cannot start the call");
  } else {
    ev = grpc_completion_queue_pluck(cq, call,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type != GRPC_OP_COMPLETE || status != GRPC_STATUS_OK) {
      char *d = grpc_slice_to_c_string(details);
      rc = RPCPLUGIN_EGRPC;
      if (err)
        snprintf(err, errlen, "%s: status %d: %s", method, (int)status,
                 d ? d : "");
      gpr_free(d);
    } else if (in) {
      grpc_slice flat = rp_flatten(in);
      size_t n = GRPC_SLICE_LENGTH(flat);
      if (n > resp_cap) {
        rc = RPCPLUGIN_ETOOBIG;
        if (err)
          snprintf(err, errlen, "%s: reply of %zu bytes, room for %zu",
                   method, n, resp_cap);
      } else {
        if (n) memcpy(resp, GRPC_SLICE_START_PTR(flat), n);
        if (resp_len) *resp_len = n;
      }
      grpc_slice_unref(flat);
    }
  }
  if (in) grpc_byte_buffer_destroy(in);
  grpc_byte_buffer_destroy(out);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&md_in);
  grpc_metadata_array_destroy(&trailing);
  grpc_call_unref(call);
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL,
                                     gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
             .type != GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
  return rc;
}
