/* libFuzzer: the manifest reader never crashes or leaks on any input, and
 * accepts only what it can describe. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <rpcplugin/host.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  rpcplugin_manifest *m = NULL;
  rpcplugin_error err;
  int rc = rpcplugin_manifest_parse((const char *)data, size, "fuzz.json", &m,
                                    &err);
  if (rc == 0) {
    /* Accepted: every accessor answers. */
    int maj, min;
    size_t i, n = rpcplugin_manifest_service_count(m);
    /* Infrastructure services or application services, never neither. */
    if (n == 0) __builtin_trap();
    if ((rpcplugin_manifest_services(m) == 0) !=
        (rpcplugin_manifest_is_application(m) != 0))
      __builtin_trap();
    for (i = 0; i < n; i++)
      if (rpcplugin_manifest_service_name(m, i)[0] == '\0') __builtin_trap();
    if (rpcplugin_manifest_infrastructure(m) &&
        !rpcplugin_manifest_is_application(m))
      __builtin_trap();
    rpcplugin_manifest_abi_version(m, &maj, &min);
    if (maj != RPCPLUGIN_ABI_MAJOR) __builtin_trap();
    if (strlen(rpcplugin_manifest_config_json(m)) < 2) __builtin_trap();
    rpcplugin_manifest_free(m);
  } else if (m != NULL || err.message[0] == '\0') {
    __builtin_trap(); /* a refusal always says why */
  }
  return 0;
}
