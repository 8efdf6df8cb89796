"""Child processes that never outlive their parent.

``embedd run`` starts Envoy and, with replicas, ``embedd serve`` children. If ``embedd run`` is
killed without a chance to stop them (SIGKILL, the OOM killer, a crashed container runtime),
they must not keep running and holding the ports. Linux's ``PR_SET_PDEATHSIG`` has the kernel
signal a child when its parent dies; ``setpriv --pdeathsig`` (util-linux) sets it in the child
just before it execs the real program, which avoids a ``preexec_fn`` (unsafe in a process with
threads, as the server's is). The signal is SIGKILL: the parent is gone, so nobody is left to
answer; a killed ``embedd serve``'s engine processes then see their socket close and exit.

The death signal fires when the *thread* that started the child ends, so children are started
from the main thread (the event loop's), which lives as long as the process.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Sequence

log = logging.getLogger(__name__)


@functools.cache
def _setpriv() -> str | None:
    path = shutil.which("setpriv")
    if path is None and sys.platform.startswith("linux"):
        log.warning(
            "setpriv (util-linux) is not installed: if embedd run is killed, its children "
            "keep running; install util-linux"
        )
    return path


def bound_to_parent(command: Sequence[str]) -> list[str]:
    """``command`` prefixed so that the kernel kills it when this process dies."""
    setpriv = _setpriv()
    if setpriv is None:
        return list(command)
    return [setpriv, "--pdeathsig", "KILL", "--", *command]
