/*
 * check.h - the smallest test harness: CHECK records a failure and goes on,
 * a test file's main returns check_report().
 */
#ifndef RPCPLUGIN_CHECK_H
#define RPCPLUGIN_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond)                                                        \
  do {                                                                     \
    check_count++;                                                         \
    if (!(cond)) {                                                         \
      check_failures++;                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,     \
              #cond);                                                      \
    }                                                                      \
  } while (0)

#define CHECK_EQ_INT(a, b)                                                 \
  do {                                                                     \
    long long va_ = (long long)(a), vb_ = (long long)(b);                  \
    check_count++;                                                         \
    if (va_ != vb_) {                                                      \
      check_failures++;                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n",    \
              __FILE__, __LINE__, #a, #b, va_, vb_);                       \
    }                                                                      \
  } while (0)

/* Substring check with the haystack shown on failure. */
#define CHECK_CONTAINS(hay, needle)                                        \
  do {                                                                     \
    const char *h_ = (hay), *n_ = (needle);                                \
    check_count++;                                                         \
    if (h_ == NULL || strstr(h_, n_) == NULL) {                            \
      check_failures++;                                                    \
      fprintf(stderr, "%s:%d: CHECK failed: \"%s\" does not contain "      \
              "\"%s\"\n", __FILE__, __LINE__, h_ ? h_ : "(null)", n_);     \
    }                                                                      \
  } while (0)

static inline int check_report(const char *name) {
  if (check_failures)
    fprintf(stderr, "%s: %d of %d checks failed\n", name, check_failures,
            check_count);
  else
    fprintf(stderr, "%s: %d checks passed\n", name, check_count);
  return check_failures ? 1 : 0;
}

#endif
