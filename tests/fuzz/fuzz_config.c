/* libFuzzer: the module's config reader on any text. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1), err[512];
  rp_config c;
  memcpy(text, data, size);
  text[size] = '\0';
  err[0] = '\0';
  if (rp_config_parse(text, &c, err, sizeof err) != 0) {
    if (err[0] == '\0') __builtin_trap();
  } else if (c.stdio.queue_bytes < 4096 || c.stdio.coalesce_bytes >
                                                c.stdio.max_message_bytes) {
    __builtin_trap();
  }
  free(text);
  return 0;
}
