/*
 * manifest_check.c - the C side of the manifest differential test
 * (tests/integration/test_manifest_schema.py): reads documents from stdin,
 * each as a 4-byte little-endian length and that many bytes, and prints
 * one line per document: "1" when librpcplugin's reader accepts it and,
 * for go-plugin's infrastructure services, rpcplugin_services.so's config
 * reader accepts its "config" too (what a load would check before serving);
 * "0 <the error>" otherwise.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <rpcplugin/host.h>

#include "config.h"

int main(void) {
  unsigned char hdr[4];
  while (fread(hdr, 1, 4, stdin) == 4) {
    size_t len = (size_t)hdr[0] | (size_t)hdr[1] << 8 | (size_t)hdr[2] << 16 |
                 (size_t)hdr[3] << 24;
    char *doc = malloc(len + 1), err2[512];
    rpcplugin_manifest *m = NULL;
    rpcplugin_error err;
    if (doc == NULL || fread(doc, 1, len, stdin) != len) return 2;
    if (rpcplugin_manifest_parse(doc, len, "d.json", &m, &err) != 0) {
      printf("0 %s\n", err.message);
    } else if (rpcplugin_manifest_services(m) != 0) {
      rp_config c;
      if (rp_config_parse(rpcplugin_manifest_config_json(m), &c, err2,
                          sizeof err2) != 0)
        printf("0 %s\n", err2);
      else
        printf("1\n");
    } else {
      printf("1\n");
    }
    rpcplugin_manifest_free(m);
    free(doc);
    fflush(stdout);
  }
  return 0;
}
