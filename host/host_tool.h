/*
 * host_tool.h - internals shared by the files of the reference host program
 * rpcplugin-host (rpcplugin_host.c, host_pipes.c, host_tls.c).  Not part of
 * the library and not installed.
 */
#ifndef RPCPLUGIN_HOST_TOOL_H
#define RPCPLUGIN_HOST_TOOL_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------ pipes */

/*
 * The host's stdout and stderr (and those of its child) are two pipes read
 * by one thread.  It reads in large reads, hands whole lines to the sink in
 * large chunks (everything up to the last newline read), and hands a
 * trailing partial line over once the pipe was quiet for HOST_PIPES_IDLE_MS
 * or when it stops.  The sink is rpcplugin_module_put_line, or a fallback;
 * it returns 0 or an RPCPLUGIN_E* code: RPCPLUGIN_ESHUTDOWN makes the
 * reader discard the rest, any other error counts the chunk as lost.
 */
typedef int (*host_pipes_sink)(void *ctx, int channel, const void *data,
                               size_t len);

typedef struct host_pipes host_pipes;

typedef struct host_pipes_stats {
  uint64_t bytes_read;
  uint64_t chunks_put; /* accepted by the sink */
  uint64_t bytes_put;
  uint64_t chunks_lost; /* refused by the sink (dropped, timed out, shut) */
  uint64_t bytes_lost;
} host_pipes_stats;

#define HOST_PIPES_IDLE_MS 10

/* Create both pipes (channel 1 = stdout, 2 = stderr).  The sink gets
 * chunks of at most max_chunk bytes (0: 1 MiB, the read buffer's size).
 * 0 or -errno. */
int host_pipes_create(host_pipes **out, host_pipes_sink sink, void *ctx,
                      size_t max_chunk);
/* The write end of a channel's pipe (the host dup2s it to 1 or 2). */
int host_pipes_write_fd(host_pipes *p, int channel);
/* Close the write ends the struct still holds (after they were dup2ed). */
void host_pipes_close_write(host_pipes *p);
/* Start the reader thread.  0 or -errno. */
int host_pipes_start(host_pipes *p);
/* Ask the reader to read what the pipes hold now (until they are empty, at
 * EOF, or drain_ms passed), hand it over, and stop.  Does not wait. */
void host_pipes_stop(host_pipes *p, long drain_ms);
/* Wait up to timeout_ms for the reader to finish after host_pipes_stop:
 * 1 when it finished, 0 when it is still busy (a sink call blocks). */
int host_pipes_wait(host_pipes *p, long timeout_ms);
/* Join the reader (it must be able to finish: stopped, and the sink no
 * longer blocks), close everything, free. */
void host_pipes_destroy(host_pipes *p);
void host_pipes_get_stats(host_pipes *p, host_pipes_stats *out);

/* -------------------------------------------------------------- tls */

/*
 * go-plugin's AutoMTLS, server side: a fresh self-signed certificate (EC
 * P-256, CN and SAN "localhost" plus SAN IP 127.0.0.1 and ::1, usable for
 * server and client auth), returned as PEM for gRPC and as the unpadded
 * standard base64 of its DER for the handshake line.
 */
typedef struct host_tls_cert {
  char *cert_pem;
  char *key_pem;
  char *cert_b64; /* base64 (RawStdEncoding) of the DER certificate */
} host_tls_cert;

int host_tls_generate(host_tls_cert *out, char *err, size_t errlen);
void host_tls_free(host_tls_cert *c);

/* Check that pem holds at least one X.509 certificate and nothing
 * unparsable before it; on failure a sentence goes to err. */
int host_tls_check_client_pem(const char *pem, char *err, size_t errlen);

#endif
