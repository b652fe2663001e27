/*
 * stdio_service.h - plugin.GRPCStdio/StreamStdio and put_line.
 */
#ifndef RPCPLUGIN_STDIO_SERVICE_H
#define RPCPLUGIN_STDIO_SERVICE_H

#include "module.h"

/* Queue one chunk; any host thread.  See rpcplugin_module_api.put_line. */
int rp_stdio_put(rp_stdio *s, int channel, const void *data, size_t len);
void rp_stdio_stats(rp_stdio *s, rpcplugin_stats *out);

#endif
