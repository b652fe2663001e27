#!/bin/sh
# The demo's child process: some output on stdout and stderr, then it waits
# (at most 30 s) to be stopped with the plugin.
i=1
while [ $i -le 3 ]; do
  echo "demo child: stdout line $i (pid $$)"
  echo "demo child: stderr line $i" >&2
  i=$((i + 1))
done
printf 'demo child: a line with no newline, flushed when the child goes quiet'
sleep 30
