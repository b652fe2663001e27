/*
 * host_tls.c - go-plugin's AutoMTLS certificate, server side, on OpenSSL 3.
 *
 * When the client sets PLUGIN_CLIENT_CERT (its own fresh certificate, PEM),
 * a go-plugin server makes a fresh self-signed certificate, serves TLS with
 * it while requiring and verifying the client's certificate against the
 * one it was given, and appends its own certificate to the handshake line
 * as base64 (RawStdEncoding: standard alphabet, no padding) of the DER.
 *
 * The certificate follows go-plugin's mtls.go: self-signed, a CA
 * (basicConstraints CA:TRUE, so that a client can use it as its only root),
 * key usages digitalSignature, keyEncipherment, keyAgreement, keyCertSign,
 * extended key usages serverAuth and clientAuth, CN and DNS SAN
 * "localhost" (go-plugin clients verify the server name "localhost"), a
 * random 128-bit serial, valid from 30 s ago for 30 years.  Differences:
 * EC P-256 instead of P-521 (as strong as needed for a throw-away
 * certificate, and several times faster to make and to use), the extra
 * SANs IP:127.0.0.1 and IP:::1 for clients that verify the address they
 * dialled, and organization "rpcplugin".
 */
#include "host_tool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

static void ssl_fail(char *err, size_t errlen, const char *what) {
  unsigned long e = ERR_get_error();
  char buf[256] = "";
  if (e) ERR_error_string_n(e, buf, sizeof buf);
  snprintf(err, errlen, "AutoMTLS: %s%s%s", what, buf[0] ? ": " : "", buf);
  ERR_clear_error();
}

static char *bio_to_string(BIO *b) {
  char *data = NULL, *out;
  long n = BIO_get_mem_data(b, &data);
  if (n < 0) return NULL;
  out = malloc((size_t)n + 1);
  if (out == NULL) return NULL;
  memcpy(out, data, (size_t)n);
  out[n] = '\0';
  return out;
}

static int add_ext(X509 *cert, int nid, const char *value) {
  X509V3_CTX ctx;
  X509_EXTENSION *ext;
  int ok;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, cert, cert, NULL, NULL, 0);
  ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
  if (ext == NULL) return 0;
  ok = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return ok;
}

/* Unpadded standard base64 (Go's base64.RawStdEncoding). */
static char *b64_raw(const unsigned char *der, int len) {
  size_t cap = 4 * (((size_t)len + 2) / 3) + 1;
  char *out = malloc(cap);
  int n;
  if (out == NULL) return NULL;
  n = EVP_EncodeBlock((unsigned char *)out, der, len);
  while (n > 0 && out[n - 1] == '=') n--;
  out[n] = '\0';
  return out;
}

int host_tls_generate(host_tls_cert *out, char *err, size_t errlen) {
  EVP_PKEY *key = NULL;
  X509 *cert = NULL;
  X509_NAME *name;
  BIGNUM *sn = NULL;
  BIO *cb = NULL, *kb = NULL;
  unsigned char *der = NULL;
  int derlen, rc = -1;

  memset(out, 0, sizeof *out);
  key = EVP_EC_gen("P-256");
  if (key == NULL) {
    ssl_fail(err, errlen, "cannot generate an EC P-256 key");
    goto done;
  }
  cert = X509_new();
  sn = BN_new();
  if (cert == NULL || sn == NULL ||
      !BN_rand(sn, 128, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) ||
      !BN_to_ASN1_INTEGER(sn, X509_get_serialNumber(cert)) ||
      !X509_set_version(cert, X509_VERSION_3) ||
      !X509_gmtime_adj(X509_getm_notBefore(cert), -30) ||
      !X509_time_adj_ex(X509_getm_notAfter(cert), 30 * 365 + 7, 0, NULL) ||
      !X509_set_pubkey(cert, key)) {
    ssl_fail(err, errlen, "cannot fill the certificate");
    goto done;
  }
  name = X509_get_subject_name(cert);
  if (!X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                                  (const unsigned char *)"rpcplugin", -1, -1,
                                  0) ||
      !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                  (const unsigned char *)"localhost", -1, -1,
                                  0) ||
      !X509_set_issuer_name(cert, name)) {
    ssl_fail(err, errlen, "cannot set the certificate's name");
    goto done;
  }
  if (!add_ext(cert, NID_basic_constraints, "critical,CA:TRUE") ||
      !add_ext(cert, NID_key_usage,
               "critical,digitalSignature,keyEncipherment,keyAgreement,"
               "keyCertSign") ||
      !add_ext(cert, NID_ext_key_usage, "serverAuth,clientAuth") ||
      !add_ext(cert, NID_subject_alt_name,
               "DNS:localhost,IP:127.0.0.1,IP:::1") ||
      !add_ext(cert, NID_subject_key_identifier, "hash")) {
    ssl_fail(err, errlen, "cannot add the certificate's extensions");
    goto done;
  }
  if (!X509_sign(cert, key, EVP_sha256())) {
    ssl_fail(err, errlen, "cannot sign the certificate");
    goto done;
  }
  cb = BIO_new(BIO_s_mem());
  kb = BIO_new(BIO_s_mem());
  if (cb == NULL || kb == NULL || !PEM_write_bio_X509(cb, cert) ||
      !PEM_write_bio_PrivateKey(kb, key, NULL, NULL, 0, NULL, NULL)) {
    ssl_fail(err, errlen, "cannot encode the certificate as PEM");
    goto done;
  }
  derlen = i2d_X509(cert, &der);
  out->cert_pem = bio_to_string(cb);
  out->key_pem = bio_to_string(kb);
  out->cert_b64 = derlen > 0 ? b64_raw(der, derlen) : NULL;
  if (out->cert_pem == NULL || out->key_pem == NULL || out->cert_b64 == NULL) {
    ssl_fail(err, errlen, "out of memory");
    host_tls_free(out);
    goto done;
  }
  rc = 0;
done:
  OPENSSL_free(der);
  BIO_free(cb);
  BIO_free(kb);
  BN_free(sn);
  X509_free(cert);
  EVP_PKEY_free(key);
  return rc;
}

void host_tls_free(host_tls_cert *c) {
  if (c->key_pem) OPENSSL_cleanse(c->key_pem, strlen(c->key_pem));
  free(c->cert_pem);
  free(c->key_pem);
  free(c->cert_b64);
  memset(c, 0, sizeof *c);
}

int host_tls_check_client_pem(const char *pem, char *err, size_t errlen) {
  BIO *b = BIO_new_mem_buf(pem, -1);
  X509 *x;
  int n = 0;
  if (b == NULL) {
    snprintf(err, errlen, "PLUGIN_CLIENT_CERT: out of memory");
    return -1;
  }
  while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
    n++;
    X509_free(x);
  }
  BIO_free(b);
  ERR_clear_error();
  if (n == 0) {
    snprintf(err, errlen,
             "PLUGIN_CLIENT_CERT: expected a PEM certificate (AutoMTLS), "
             "found none");
    return -1;
  }
  return 0;
}
