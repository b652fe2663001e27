/*
 * rpb_lines.c - W2's child: print N lines of SIZE bytes each (SIZE counts
 * the newline) to stdout as fast as the pipe takes them, in 64 KiB writes,
 * the way a chatty plugin would.  Each line starts with its 8-digit number.
 *
 *   rpb_lines N SIZE
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int write_all(const char *p, size_t n) {
  while (n > 0) {
    ssize_t k = write(1, p, n);
    if (k < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

int main(int argc, char **argv) {
  long n, i;
  size_t size, k, used = 0, cap = 1u << 16;
  char *buf, *line;
  if (argc != 3) {
    fprintf(stderr, "usage: rpb_lines N SIZE\n");
    return 2;
  }
  n = atol(argv[1]);
  size = (size_t)atol(argv[2]);
  if (n < 0 || size < 10) {
    fprintf(stderr, "rpb_lines: SIZE must be at least 10\n");
    return 2;
  }
  if (cap < size) cap = size;
  buf = malloc(cap);
  line = malloc(size + 1);
  for (k = 0; k < size; k++) line[k] = (char)('a' + k % 26);
  line[size - 1] = '\n';
  for (i = 0; i < n; i++) {
    char num[16];
    snprintf(num, sizeof num, "%08ld", i % 100000000L);
    memcpy(line, num, 8);
    if (used + size > cap) {
      if (write_all(buf, used) != 0) return 1;
      used = 0;
    }
    memcpy(buf + used, line, size);
    used += size;
  }
  if (used && write_all(buf, used) != 0) return 1;
  free(buf);
  free(line);
  return 0;
}
