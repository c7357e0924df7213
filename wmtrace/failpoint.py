"""Named crash points for crash-consistency tests: inert unless WMTRACE_FAILPOINT names one.

`reached("init:key")` kills the process with SIGKILL when WMTRACE_FAILPOINT=init:key, exactly as a
power cut or the OOM killer would at that step, so tests can prove that no interruption point of
`init` or `issue` loses a key or a registered copy (tests/test_crash.py). Nothing else happens here.
"""

from __future__ import annotations

import os
import signal


def reached(name: str) -> None:
    if os.environ.get("WMTRACE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
