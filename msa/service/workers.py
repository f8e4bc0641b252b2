# -*- test-case-name: tests.test_workers -*-
"""
Several processes taking submissions on the same listeners (C{[server]
workers}), so that the MSA uses more than one CPU core: the reactor thread
of one Python process (TLS, SMTP, SASL) is the limit on a busy host, and
the GIL keeps a second thread from adding to it (bench/RESULTS.md).

The process C{twistd digipoort-msa} starts is worker 0.  It binds every
listener, as it always does, and then starts the other workers
(L{msa.service.supervisor}): forked before its reactor existed, so that
they share its modules' memory (L{msa.service.forked}), or else C{python -m
msa.service.worker}; each is given the listening sockets themselves (the
same sockets: the kernel hands each connection to whichever process
accepts it first, so a busy worker takes fewer) and its number.  A worker
builds the same service from the same configuration file
(L{workerConfig}), with what must not be shared made its own:

  - its spool, C{<spool directory>/workers/N}, and so its own relay runner
    and group commit: a message is the spool's whose worker took it, from
    the 250 to its relay;
  - its state directory, C{<state_dir>/workers/N} (control socket,
    outcomes, the accounts cache);
  - its metrics endpoint: C{tcp:PORT...} becomes C{tcp:PORT+N...}, C{unix:PATH}
    becomes C{unix:PATH.N};
  - no LMTP or POP3 listener and no mailbox recovery: the return channel
    is worker 0's alone.

The audit log is shared: each record is appended under its lock among
processes (L{msa.audit.chainedfile}), the chain continued from the file.
The limits are shared too: kept by worker 0 for every worker with
C{[limits] backend = "memory"} (L{msa.policy.workerlimits}: each worker asks
it over a socket pair given at its start), or counted in Redis.

A worker's log events come to worker 0 on the worker's standard error,
one JSON object per line (its text's fields formatted by the worker, a
failure as its traceback's text), and go into its log with C{log_system} C{worker-N} and
a C{worker} field.  Worker 0 starts a worker again when it ends (after half
a second, doubled while it keeps ending soon after its start, up to 30 s);
the messages its spool holds wait there until the new one relays them.
A worker whose standard input closes (worker 0 is gone, even killed)
stops as on SIGTERM.  On stop, worker 0 sends every worker SIGTERM at
once, and its own services stop beside theirs; its last step waits until
they have all ended, killing one that is still there ten seconds past
C{shutdown_grace}.

When C{workers} is lowered, worker 0 relays what the spools of the workers
no longer started still hold (L{relayLeftovers}), so that nothing waits
for a worker that will never come.

This module has what a worker is (its configuration, its directories, the
sockets it is given) and worker 0's part that is not about processes
(the sockets it keeps, the spools it relays); L{msa.service.supervisor}
starts, watches and stops the processes, L{msa.service.worker} is a
worker's program.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from msa.queue.spool import Spool
from msa.service.config import Config
from msa.service.services import openSpool, recordRecovered

log = Logger()

#: Where the workers' spools and state directories go, in the spool
#: directory and in the state directory.
DIRECTORY = "workers"


def workerDirectory(base: str, number: int) -> str:
    """
    Worker C{number}'s directory under C{base} (a spool or state directory).
    """
    return os.path.join(base, DIRECTORY, str(number))


_TCP_PORT = re.compile(r"^(tcp6?:(?:port=)?)(\d+)(.*)$")
_UNIX_PATH = re.compile(r"^(unix:(?:address=)?)((?:[^:\\]|\\.)+)(.*)$")


def workerEndpoint(description: str, number: int) -> str | None:
    """
    Worker C{number}'s version of the endpoint C{description} (C{[metrics]
    listen}): a TCP port moved up by C{number}, a UNIX socket path with
    C{.number} added; L{None} for another kind of endpoint (the worker
    serves no metrics).
    """
    tcp = _TCP_PORT.match(description)
    if tcp is not None:
        port = int(tcp.group(2))
        if port == 0:
            return description
        return f"{tcp.group(1)}{port + number}{tcp.group(3)}"
    unix = _UNIX_PATH.match(description)
    if unix is not None:
        return f"{unix.group(1)}{unix.group(2)}.{number}{unix.group(3)}"
    return None


def workerConfig(config: Config, number: int, certificate: tuple[str, str]) -> Config:
    """
    Worker C{number}'s configuration: C{config} with its own spool, state
    directory and metrics endpoint, without the return channel's
    listeners, and with worker 0's server certificate (C{certificate}: the
    paths of it and its key, which may be the self-signed one of built-in
    defaults).
    """
    values = copy.deepcopy(config.values)
    server = values["server"]
    server["state_dir"] = workerDirectory(server["state_dir"], number)
    server["workers"] = 1
    values["spool"]["directory"] = workerDirectory(values["spool"]["directory"], number)
    values["tls"]["certificate"], values["tls"]["key"] = certificate
    for section, keys in (
        ("lmtp", ("listeners", "tls_listeners")),
        ("pop3", ("starttls_listeners", "implicit_tls_listeners")),
    ):
        for key in keys:
            values[section][key] = []
    listen = values["metrics"]["listen"]
    if listen:
        values["metrics"]["listen"] = workerEndpoint(listen, number)
    # Its events go into worker 0's log, and so into its JSON file.
    values["logging"]["json_file"] = None
    return Config(values, config.path)


def leftoverSpools(spoolDirectory: str, workers: int) -> list[str]:
    """
    The spools of workers numbered C{workers} or higher (no longer
    started) that still hold a queue, in number order.
    """
    base = os.path.join(spoolDirectory, DIRECTORY)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.isdigit() or int(name) < workers:
            continue
        directory = os.path.join(base, name)
        if os.path.isdir(os.path.join(directory, "queue")):
            found.append((int(name), directory))
    return [directory for _, directory in sorted(found)]


def relayLeftovers(
    config: Config,
    audit: Any,
    reactor: Any,
    runnerFor: Callable[[Config, Spool, Any], service.Service],
) -> list[service.Service]:
    """
    In worker 0: a relay runner (made by C{runnerFor}) for each spool of a
    worker no longer started that still holds messages (L{leftoverSpools}),
    after the spool's recovery and the audit log's
    (L{msa.service.services.recordRecovered}).
    """
    runners = []
    spools = leftoverSpools(config["spool"]["directory"], config["server"]["workers"])
    for directory in spools:
        # Its ledger of outcomes it could not record is in its worker's
        # state directory: a delivery recorded there is not made again.
        state = workerDirectory(
            config["server"]["state_dir"], int(os.path.basename(directory))
        )
        spool = openSpool(config, directory, state, reactor)
        spool.recover()
        if audit is not None:
            spool.audit = audit
            recordRecovered(audit, spool)
        if not spool.pending():
            continue
        log.warn(
            "The spool {directory} of a worker no longer started holds "
            "{count} messages: relayed from here",
            directory=directory,
            count=len(spool.pending()),
        )
        runner = runnerFor(config, spool, reactor)
        runner.setName(f"relay {directory}")
        runners.append(runner)
    return runners


# -- worker 0: the listening sockets -------------------------------------


@implementer(IStreamServerEndpoint)
@attrs.define
class KeptPort:
    """
    An endpoint that keeps the port it listens on, so that the workers can
    be given its socket (C{port.fileno()}).
    """

    endpoint: Any
    key: str
    port: Any = None

    def listen(self, factory):
        def keep(port):
            self.port = port
            return port

        return self.endpoint.listen(factory).addCallback(keep)


# -- a worker: the sockets it is given -------------------------------------


class AdoptedListener(service.Service):
    """
    A listening socket worker 0 bound, given to this worker as descriptor
    C{fd}: it accepts connections for C{factory} while the service runs.
    """

    def __init__(self, fd: int, factory: Any, reactor: Any) -> None:
        self.fd = fd
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._adopt()

    def startService(self) -> None:
        super().startService()
        self._adopt()

    def _adopt(self) -> None:
        if self.port is not None:
            return
        with socket.socket(fileno=os.dup(self.fd)) as given:
            family = given.family
        # adoptStreamPort takes a copy; the descriptor it came on is ours.
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.factory)
        os.close(self.fd)

    def stopService(self):
        super().stopService()
        if self.port is None:
            return None
        return self.port.stopListening()
