"""A hook for crash tests: stop the process at a named point so a test can SIGKILL it exactly there.

With ``DFKD_DEPLOY_PAUSE_AT=<point>`` in the environment, the process that reaches ``<point>``
writes its pid to the file named by ``DFKD_DEPLOY_PAUSE_FILE`` (atomically) and sleeps until it
is killed. Points:

- ``pool.add:N``: right after this process wrote its N-th pool shard (mid-synthesis: the shard
  is on disk and in the index, the epoch's checkpoint is not);
- ``kd:E:S``: right after the optimizer step of KD step S in epoch E (1-based).

Without the variable (always, outside tests) ``reached`` is one environment lookup.
"""
from __future__ import annotations

import os
import time

PAUSE_AT = "DFKD_DEPLOY_PAUSE_AT"
PAUSE_FILE = "DFKD_DEPLOY_PAUSE_FILE"


def reached(point: str) -> None:
    if os.environ.get(PAUSE_AT) != point:
        return
    marker = os.environ.get(PAUSE_FILE)
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(tmp, marker)
    while True:   # until SIGKILL
        time.sleep(3600)
