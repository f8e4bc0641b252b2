# -*- test-case-name: tests.test_slowclients -*-
"""
The listen backlog of the daemon's listeners (C{[server] listen_backlog}):
added to the endpoint descriptions (L{withBacklog}) of the submission and
POP3 listeners, and checked against the kernel's cap at start
(L{checkBacklog}).
"""

import re

from twisted.logger import Logger

log = Logger()


#: Endpoint types whose description takes C{backlog=}.
_BACKLOG_TYPES = ("tcp", "tcp6", "unix")


def withBacklog(description: str, backlog: int) -> str:
    """
    A listener's endpoint description with the listen backlog
    (C{[server] listen_backlog}) added, so that a burst of connections waits
    in the kernel's queue instead of being dropped (Twisted's default is
    50).  An explicit C{backlog=} is kept; C{systemd:} sockets get theirs
    from the socket unit (C{Backlog=} in C{etc/digipoort-msa.socket}).
    """
    parts = re.split(r"(?<!\\):", description)
    if parts[0] not in _BACKLOG_TYPES or any(
        p.startswith("backlog=") for p in parts[1:]
    ):
        return description
    return f"{description}:backlog={backlog}"


def checkBacklog(backlog: int, somaxconn: str = "/proc/sys/net/core/somaxconn"):
    """
    Say so at start when the kernel will shorten the listen backlog.
    """
    try:
        with open(somaxconn) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return
    if backlog > limit:
        log.warn(
            "The listen backlog ([server] listen_backlog, default twice "
            "max_connections) is {backlog}, but the kernel caps it at "
            "net.core.somaxconn = {limit}; raise that (sysctl) for the whole "
            "backlog",
            backlog=backlog,
            limit=limit,
        )
