"""What every Python client driver shares: the URLs and the switch command
the Rust test (tests/client_libraries.rs) hands over in the environment, a
check recorder, and a deadline-bound wait.

Environment:
  PROXY_URL     the proxy's URL, with the sslmode to test
  SSLMODE       disable | require (what PROXY_URL asks for)
  DIRECT_URLS   JSON {"main": url, "dev": url}: each branch's own socket
  PGTWIG_USE    JSON command prefix, e.g. ["/path/pgtwig", "use"]; run in
                the test's repository with its PGTWIG_HOME
A driver prints one JSON object (the checks it passed) on its last line, or
fails with an AssertionError saying what differed.
"""

import json
import os
import subprocess
import sys
import time

PROXY_URL = os.environ["PROXY_URL"]
SSLMODE = os.environ["SSLMODE"]
DIRECT_URLS = json.loads(os.environ["DIRECT_URLS"])
PGTWIG_USE = json.loads(os.environ["PGTWIG_USE"])

passed = []


def check(name, ok, detail=""):
    assert ok, f"{name}: {detail}"
    passed.append(name)


def other_branch(branch):
    return "dev" if branch == "main" else "main"


def use(branch):
    out = subprocess.run(PGTWIG_USE + [branch], capture_output=True, text=True)
    assert out.returncode == 0, f"pgtwig use {branch}: {out.stderr}"


def wait_until(secs, what, f):
    deadline = time.monotonic() + secs
    while not f():
        assert time.monotonic() < deadline, f"timed out after {secs}s waiting for {what}"
        time.sleep(0.02)


def done(**extra):
    print(json.dumps({"sslmode": SSLMODE, "passed": passed, **extra}))
    sys.stdout.flush()
