/*
 * broker.h - plugin.GRPCBroker/StartStream and the broker entries of the
 * host API.
 */
#ifndef RPCPLUGIN_BROKER_H
#define RPCPLUGIN_BROKER_H

#include "module.h"

void rp_broker_stats(rp_broker *b, rpcplugin_stats *out);

/* The rpcplugin_module_api broker entries (instance is an rp_instance). */
int rp_broker_advertise(void *instance, uint32_t service_id,
                        const char *network, const char *address);
int rp_broker_wait_advertised(void *instance, uint32_t service_id,
                              int timeout_ms, rpcplugin_conn_info *out);
int rp_broker_knock(void *instance, uint32_t service_id, const char *network,
                    const char *address, int timeout_ms, char *err,
                    size_t errlen);
int rp_broker_channel(void *instance, uint32_t service_id,
                      grpc_channel **out);
void rp_broker_release_channel(void *instance, grpc_channel *channel);

#endif
