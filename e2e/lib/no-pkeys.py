"""Runs a command whose memory protection keys are refused: `pkey_alloc` fails with ENOSYS
(a seccomp filter, inherited by every process it starts), as on a CPU without them.

    /usr/bin/python3 e2e/lib/no-pkeys.py COMMAND [ARG...]

Why: Envoy 1.36's V8 write-protects its code with a protection key that only threads started
after it took the key may use, so a worker thread running a Wasm filter pushed to a live proxy
dies with SIGSEGV (SEGV_PKUERR) on CPUs with `pku` (V8 bug, issues.chromium.org/360909072).
Refused a key, V8 protects its code without one. Needs Debian's python3-seccomp.
"""

import errno
import os
import sys

import seccomp

if len(sys.argv) < 2:
    sys.exit(__doc__)
rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "pkey_alloc")
rules.load()
os.execvp(sys.argv[1], sys.argv[1:])
