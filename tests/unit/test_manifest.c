/*
 * test_manifest.c - the manifest reader: the shipped manifests load, and
 * every kind of bad input is refused with the file, the field and what was
 * expected.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <rpcplugin/host.h>

#include "check.h"

#define GOOD                                                              \
  "\"manifest_version\": 1, \"name\": \"t\", \"module\": \"m.so\", "      \
  "\"abi_version\": \"1.0\", \"protocol_version\": 1"

/* Parse text; return the error message (static) or NULL on success. */
static const char *parse_err(const char *json, int *code) {
  static rpcplugin_error err;
  rpcplugin_manifest *m = NULL;
  int rc = rpcplugin_manifest_parse(json, strlen(json), "dir/t.json", &m,
                                    &err);
  if (code) *code = rc;
  if (rc == 0) {
    CHECK(m != NULL);
    rpcplugin_manifest_free(m);
    return NULL;
  }
  CHECK(m == NULL);
  CHECK_EQ_INT(err.code, rc);
  return err.message;
}

static void test_good(void) {
  rpcplugin_manifest *m = NULL;
  rpcplugin_error err;
  const char *json =
      "{" GOOD ", \"services\": [\"plugin.GRPCStdio\", "
      "\"grpc.health.v1.Health\"], \"config\": {\"stdio\": {\"overflow\": "
      "\"block\"}}}";
  int maj, min;
  CHECK_EQ_INT(rpcplugin_manifest_parse(json, strlen(json), "a/b/t.json", &m,
                                        &err),
               0);
  if (m == NULL) return;
  CHECK(strcmp(rpcplugin_manifest_name(m), "t") == 0);
  CHECK(strcmp(rpcplugin_manifest_module(m), "m.so") == 0);
  CHECK(strcmp(rpcplugin_manifest_path(m), "a/b/t.json") == 0);
  CHECK_EQ_INT(rpcplugin_manifest_services(m),
               RPCPLUGIN_SVC_STDIO | RPCPLUGIN_SVC_HEALTH);
  rpcplugin_manifest_abi_version(m, &maj, &min);
  CHECK(maj == 1 && min == 0);
  CHECK_EQ_INT(rpcplugin_manifest_protocol_version(m), 1);
  CHECK(strcmp(rpcplugin_manifest_config_json(m),
               "{\"stdio\":{\"overflow\":\"block\"}}") == 0);
  rpcplugin_manifest_free(m);
}

static void test_application(const char *dir) {
  rpcplugin_manifest *m = NULL, *infra = NULL;
  rpcplugin_error err;
  char json[512];
  snprintf(json, sizeof json,
           "{\"manifest_version\": 1, \"name\": \"kv\", \"module\": "
           "\"kv.so\", \"abi_version\": \"1.1\", \"protocol_version\": 1, "
           "\"services\": [\"proto.KV\", \"proto.Other_2\"], "
           "\"infrastructure\": \"%s/default.json\", \"config\": "
           "{\"anything\": [1, 2]}}",
           dir);
  CHECK_EQ_INT(rpcplugin_manifest_parse(json, strlen(json), "app/kv.json", &m,
                                        &err),
               0);
  if (m == NULL) return;
  CHECK_EQ_INT(rpcplugin_manifest_is_application(m), 1);
  CHECK_EQ_INT((int)rpcplugin_manifest_services(m), 0);
  CHECK_EQ_INT((int)rpcplugin_manifest_service_count(m), 2);
  CHECK(strcmp(rpcplugin_manifest_service_name(m, 0), "proto.KV") == 0);
  CHECK(strcmp(rpcplugin_manifest_service_name(m, 1), "proto.Other_2") == 0);
  CHECK(rpcplugin_manifest_service_name(m, 2) == NULL);
  CHECK(strcmp(rpcplugin_manifest_config_json(m), "{\"anything\":[1,2]}") ==
        0);
  /* An absolute "infrastructure" loads that manifest. */
  CHECK_EQ_INT(rpcplugin_manifest_load_infrastructure(m, &infra, &err), 0);
  if (infra) {
    CHECK_EQ_INT(rpcplugin_manifest_is_application(infra), 0);
    CHECK_EQ_INT((int)rpcplugin_manifest_service_count(infra), 4);
  }
  rpcplugin_manifest_free(infra);
  rpcplugin_manifest_free(m);

  /* A bare name nobody has: the error names the folders looked in. */
  snprintf(json, sizeof json,
           "{\"manifest_version\": 1, \"name\": \"kv\", \"module\": "
           "\"kv.so\", \"abi_version\": \"1.1\", \"protocol_version\": 1, "
           "\"services\": [\"proto.KV\"], \"infrastructure\": "
           "\"no-such-infra.json\"}");
  m = NULL;
  CHECK_EQ_INT(rpcplugin_manifest_parse(json, strlen(json), "app/kv.json", &m,
                                        &err),
               0);
  if (m == NULL) return;
  infra = NULL;
  CHECK_EQ_INT(rpcplugin_manifest_load_infrastructure(m, &infra, &err),
               RPCPLUGIN_ENOENT);
  CHECK(infra == NULL);
  CHECK_CONTAINS(err.message, "app/kv.json: field \"infrastructure\": no "
                              "manifest \"no-such-infra.json\" in app");
  rpcplugin_manifest_free(m);
}

static void test_shipped(const char *dir) {
  static const char *const names[] = {"default.json", "controller-health.json",
                                      "stdio-broker.json"};
  size_t i;
  for (i = 0; i < sizeof names / sizeof names[0]; i++) {
    char path[1024];
    rpcplugin_manifest *m = NULL;
    rpcplugin_error err;
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    CHECK_EQ_INT(rpcplugin_manifest_load(path, &m, &err), 0);
    if (m == NULL) fprintf(stderr, "%s\n", err.message);
    rpcplugin_manifest_free(m);
  }
}

static void test_errors(void) {
  int code;
  const char *e;

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\"], "
                "\"extra\": 1}", &code);
  CHECK_EQ_INT(code, RPCPLUGIN_EMANIFEST);
  CHECK_CONTAINS(e, "dir/t.json");
  CHECK_CONTAINS(e, "unknown field \"extra\"");

  e = parse_err("{" GOOD ", \"services\": \"plugin.GRPCStdio\"}", &code);
  CHECK_CONTAINS(e, "field \"services\": expected a non-empty array");
  CHECK_CONTAINS(e, "got string \"plugin.GRPCStdio\"");

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\", 3]}", NULL);
  CHECK_CONTAINS(e, "field \"services[1]\"");
  CHECK_CONTAINS(e, "got number 3");

  e = parse_err("{" GOOD ", \"services\": [\"plugin..Nope\"]}", NULL);
  CHECK_CONTAINS(e, "services[0]");
  CHECK_CONTAINS(e, "\"plugin.GRPCBroker\"");
  CHECK_CONTAINS(e, "an application service such as \"proto.KV\"");
  CHECK_CONTAINS(e, "got string \"plugin..Nope\"");
  e = parse_err("{" GOOD ", \"services\": [\"proto.1KV\"]}", NULL);
  CHECK_CONTAINS(e, "services[0]");
  e = parse_err("{" GOOD ", \"services\": [\"proto.KV \"]}", NULL);
  CHECK_CONTAINS(e, "services[0]");

  /* Infrastructure or application services, not both. */
  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\", "
                "\"proto.KV\"]}", &code);
  CHECK_EQ_INT(code, RPCPLUGIN_EMANIFEST);
  CHECK_CONTAINS(e, "field \"services[1]\": a manifest names either");
  /* "infrastructure" belongs to an application's manifest. */
  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\"], "
                "\"infrastructure\": \"host.json\"}", NULL);
  CHECK_CONTAINS(e, "field \"infrastructure\": only an application");
  e = parse_err("{" GOOD ", \"services\": [\"proto.KV\"], "
                "\"infrastructure\": 3}", NULL);
  CHECK_CONTAINS(e, "field \"infrastructure\"");
  CHECK_CONTAINS(e, "got number 3");

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\", "
                "\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "listed twice");

  e = parse_err("{" GOOD ", \"services\": []}", NULL);
  CHECK_CONTAINS(e, "non-empty array");

  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", "
                "\"abi_version\": \"1.0\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "missing required field \"module\"");

  e = parse_err("{\"manifest_version\": \"1\", \"name\": \"t\"}", NULL);
  CHECK_CONTAINS(e, "field \"manifest_version\": expected an integer");
  CHECK_CONTAINS(e, "got string \"1\"");

  e = parse_err("{\"manifest_version\": 2, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"1.0\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "field \"manifest_version\": expected 1, got number 2");

  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"1.0\", \"protocol_version\": 1.5, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "protocol_version");

  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"one\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "field \"abi_version\": expected \"MAJOR.MINOR\"");
  /* As the schema's pattern: no leading zero in the major, 1-4 digits of
   * minor (found by the differential test against the schema). */
  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"01.0\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "field \"abi_version\": expected \"MAJOR.MINOR\"");
  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"1.12345\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "field \"abi_version\": expected \"MAJOR.MINOR\"");

  e = parse_err("{\"manifest_version\": 1, \"name\": \"t\", \"module\": "
                "\"m\", \"abi_version\": \"2.3\", \"protocol_version\": 1, "
                "\"services\": [\"plugin.GRPCStdio\"]}", &code);
  CHECK_EQ_INT(code, RPCPLUGIN_EABI);
  CHECK_CONTAINS(e, "built for ABI 2.3");
  {
    char want[64];
    snprintf(want, sizeof want, "this host speaks ABI %d.%d",
             RPCPLUGIN_ABI_MAJOR, RPCPLUGIN_ABI_MINOR);
    CHECK_CONTAINS(e, want);
  }

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\"], "
                "\"config\": []}", NULL);
  CHECK_CONTAINS(e, "field \"config\": expected an object, got an array");

  e = parse_err("{" GOOD ", \"name\": \"u\", \"services\": "
                "[\"plugin.GRPCStdio\"]}", NULL);
  CHECK_CONTAINS(e, "field \"name\" appears more than once");

  e = parse_err("{" GOOD ",\n \"services\": [\"plugin.GRPCStdio\",]\n}",
                NULL);
  CHECK_CONTAINS(e, "not valid JSON (line 2");

  e = parse_err("[1, 2]", NULL);
  CHECK_CONTAINS(e, "expected an object, got an array");

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\"]} x", NULL);
  CHECK_CONTAINS(e, "unexpected text after the object");

  e = parse_err("{" GOOD ", \"services\": [\"plugin.GRPCStdio\"], "
                "\"name\": \"\"}", NULL);
  CHECK(e != NULL);
}

static void test_load_errors(void) {
  rpcplugin_manifest *m = NULL;
  rpcplugin_error err;
  char path[] = "/tmp/rp-manifest-XXXXXX";
  int fd;
  CHECK_EQ_INT(rpcplugin_manifest_load("/nonexistent/x.json", &m, &err),
               RPCPLUGIN_ENOENT);
  CHECK_CONTAINS(err.message, "/nonexistent/x.json");
  CHECK_EQ_INT(rpcplugin_manifest_load("/tmp", &m, &err), RPCPLUGIN_EMANIFEST);
  CHECK_CONTAINS(err.message, "not a regular file");
  fd = mkstemp(path);
  CHECK(fd >= 0);
  CHECK(write(fd, "{\"a\":\0}", 7) == 7);
  close(fd);
  CHECK_EQ_INT(rpcplugin_manifest_load(path, &m, &err), RPCPLUGIN_EMANIFEST);
  CHECK_CONTAINS(err.message, "NUL byte");
  unlink(path);
}

static void test_errnames(void) {
  CHECK(strcmp(rpcplugin_err_name(RPCPLUGIN_EABI), "RPCPLUGIN_EABI") == 0);
  CHECK(strcmp(rpcplugin_strerror(RPCPLUGIN_OK), "success") == 0);
  CHECK(strcmp(rpcplugin_strerror(-9999), "unknown error") == 0);
}

int main(int argc, char **argv) {
  test_good();
  test_shipped(argc > 1 ? argv[1] : "manifests");
  test_application(argc > 1 ? argv[1] : "manifests");
  test_errors();
  test_load_errors();
  test_errnames();
  return check_report("test_manifest");
}
