# -*- test-case-name: tests.test_limits_redis,tests.test_limits_config -*-
"""
The connection to Redis of the shared limits (L{msa.policy.redislimits}):
its address from C{[limits] url} (L{RedisAddress}; C{rediss://} for TLS,
the server's certificate verified; C{redis+sentinel://} for the master
Redis Sentinel names) and the one connection,
with a deadline on every call and the outage logged once
(L{RedisConnection}).  txredisapi (the extra C{digipoort-msa[redis]}) is
imported only when a connection is made.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from msa.errors import LimitsUnavailable

__all__ = ["RedisAddress", "RedisConnection"]

log = Logger(namespace="msa.policy.redislimits")

#: The commands the limits send, each as a call of the txredisapi
#: connection handler's method: L{RedisConnection.call} sends these and no
#: other.
COMMANDS: dict[str, Callable[..., Any]] = {
    "delete": lambda redis, *args: redis.delete(*args),
    "eval": lambda redis, *args: redis.eval(*args),
    "ping": lambda redis: redis.ping(),
    "zrem": lambda redis, *args: redis.zrem(*args),
}


@attrs.frozen
class RedisAddress:
    """
    Where Redis listens, from C{[limits] url}: C{redis://[[user]:password@]
    host[:port][/db]}, the same with C{rediss://} for TLS,
    C{redis+sentinel://[[user]:password@]host:port[,host:port...]/service
    [/db]} for the master of C{service} that Redis Sentinel names, or
    C{unix:///path/to/socket[?db=N]}.

    @ivar tls: C{rediss://}: TLS, the server's certificate verified against
        C{host}.
    @ivar sentinels: the Sentinels' (host, port) to ask; empty when the URL
        names Redis itself.
    @ivar service: the name of the master the Sentinels monitor.
    """

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """
        @raise ValueError: saying what is wrong with C{url}.
        """
        parsed = urllib.parse.urlsplit(url)
        username = urllib.parse.unquote(parsed.username) if parsed.username else None
        password = urllib.parse.unquote(parsed.password) if parsed.password else None
        if parsed.scheme == "unix":
            if not parsed.path:
                raise ValueError("a unix: URL needs the socket's path")
            query = urllib.parse.parse_qs(parsed.query)
            db = query.get("db", ["0"])[0]
            if not db.isdigit():
                raise ValueError(f"db={db!r} is not a database number")
            return cls(
                path=parsed.path, db=int(db), username=username, password=password
            )
        if parsed.scheme == "redis+sentinel":
            return cls._sentinel(parsed, username, password)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(
                "must start with redis://, rediss://, redis+sentinel:// or unix://"
            )
        if not parsed.hostname:
            raise ValueError("no host in the URL")
        try:
            port = parsed.port or 6379
        except ValueError:
            raise ValueError("the port is not a number") from None
        db = parsed.path.strip("/") or "0"
        if not db.isdigit():
            raise ValueError(f"/{db} is not a database number")
        return cls(
            host=parsed.hostname,
            port=port,
            db=int(db),
            username=username,
            password=password,
            tls=parsed.scheme == "rediss",
        )

    @classmethod
    def _sentinel(
        cls,
        parsed: urllib.parse.SplitResult,
        username: str | None,
        password: str | None,
    ) -> RedisAddress:
        sentinels = []
        for item in parsed.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port of a Sentinel")
            sentinels.append((host.strip("[]"), int(port)))
        parts = parsed.path.strip("/").split("/")
        if not parts[0] or len(parts) > 2:
            raise ValueError("the path must be /service or /service/db")
        db = parts[1] if len(parts) == 2 else "0"
        if not db.isdigit():
            raise ValueError(f"/{db} is not a database number")
        return cls(
            sentinels=tuple(sentinels),
            service=parts[0],
            db=int(db),
            username=username,
            password=password,
        )

    def describe(self) -> str:
        """
        The address for the log, without the password.
        """
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"master {self.service} of Sentinel {where} db {self.db}"
        if self.path is not None:
            return f"unix:{self.path} db {self.db}"
        over = " over TLS" if self.tls else ""
        return f"{self.host}:{self.port} db {self.db}{over}"


class RedisConnection:
    """
    The one connection to Redis, and whether Redis is reachable.

    Every call has a deadline (C{timeout}): one that gets no answer in time,
    or an error, fails with L{LimitsUnavailable}, and the first such failure
    of an outage is logged at critical level.  While Redis is known to be
    unreachable and no connection is up, calls fail at once rather than
    each wait for the deadline; txredisapi keeps reconnecting meanwhile.

    @ivar unavailableSince: when the outage began (reactor time), or
        L{None} while Redis answers.
    @ivar lastError: what the last failed call met.
    """

    #: Seconds between reconnection attempts, at most.
    maxReconnectDelay = 2.0

    def __init__(
        self,
        address: RedisAddress,
        timeout: float,
        reactor,
        whileUnavailable: str = "",
        contextFactory: Any = None,
    ) -> None:
        self.address = address
        #: The TLS client options for C{rediss://} (L{msa.tls.
        #: clientContextFactory}), or L{None}.
        self.contextFactory = contextFactory
        self.timeout = timeout
        self.reactor = reactor
        self.whileUnavailable = whileUnavailable
        self.unavailableSince: float | None = None
        self.lastError = ""
        self._factory: Any = None
        #: txredisapi's Sentinel client, for C{redis+sentinel://}.
        self._sentinel: Any = None

    def connect(self) -> None:
        # Imported here: txredisapi is needed only with backend = "redis"
        # (the extra digipoort-msa[redis]).
        import txredisapi

        address = self.address
        options: dict[str, Any] = dict(
            isLazy=True,
            password=address.password,
            username=address.username,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        # Database 0 needs no SELECT: txredisapi stops reconnecting for good
        # when the connection drops during its SELECT (or AUTH).
        dbid = address.db or None
        factory: Any
        if address.sentinels:
            # txredisapi's Sentinel client asks the Sentinels for the
            # service's master before every connection, and drops the
            # connections to a master that lost its role (a failover).
            sentinel = txredisapi.Sentinel(
                list(address.sentinels),
                connectTimeout=self.timeout,
                replyTimeout=self.timeout,
            )
            sentinel.discovery_timeout = max(self.timeout, 1.0)
            self._sentinel = sentinel
            factory = sentinel.master_for(address.service, dbid=dbid, **options)
            factory = factory._factory
        else:
            factory = txredisapi.RedisFactory(address.describe(), dbid, 1, **options)
        factory.initialDelay = 0.2
        factory.maxDelay = self.maxReconnectDelay
        if not address.sentinels:
            factory.startConnecting(self._endpoint())
        self._factory = factory

    def _endpoint(self) -> Any:
        """
        Where Redis itself listens: its UNIX socket, or its host and port
        (with TLS for C{rediss://}).
        """
        address = self.address
        if address.path is not None:
            return UNIXClientEndpoint(self.reactor, address.path, self.timeout)
        assert address.host is not None
        endpoint: Any = HostnameEndpoint(
            self.reactor, address.host, address.port, self.timeout
        )
        if self.contextFactory is not None:
            endpoint = wrapClientTLS(self.contextFactory, endpoint)
        return endpoint

    def disconnect(self) -> defer.Deferred:
        factory, self._factory = self._factory, None
        sentinel, self._sentinel = self._sentinel, None
        if factory is None:
            return defer.succeed(None)
        done = [factory.disconnect()]
        if sentinel is not None:
            done.append(sentinel.disconnect())
        return defer.gatherResults(done, consumeErrors=True)

    def call(self, command: str, *args: Any) -> defer.Deferred:
        """
        Run one of L{COMMANDS}.

        @return: a L{Deferred} firing with the reply, or failing with
            L{LimitsUnavailable}.
        @raise ValueError: for a command not in L{COMMANDS} (a programming
            error, not an outage of Redis).
        """
        send = COMMANDS.get(command)
        if send is None:
            raise ValueError(f"not a command the limits use: {command!r}")
        factory = self._factory
        if factory is None:
            return defer.fail(LimitsUnavailable("not connected to Redis"))
        if self.unavailableSince is not None and not factory.size:
            return defer.fail(LimitsUnavailable(self.lastError))
        d = defer.maybeDeferred(send, factory.handler, *args)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(self._answered, self._failed)
        return d

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        return self.call("eval", script, keys, [str(a) for a in args])

    def _answered(self, result: object) -> object:
        if self.unavailableSince is not None:
            seconds = self.reactor.seconds() - self.unavailableSince
            self.unavailableSince = None
            log.warn(
                "limits: Redis at {redis} answers again, after {seconds:.1f}s; "
                "the shared limits apply again",
                event="limits-recovered",
                redis=self.address.describe(),
                seconds=seconds,
            )
        return result

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            error = f"no answer within {self.timeout}s"
        else:
            error = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        self.lastError = error
        if self.unavailableSince is None:
            self.unavailableSince = self.reactor.seconds()
            log.critical(
                "limits: Redis at {redis} cannot be reached ({error}); {consequence}",
                event="limits-unavailable",
                redis=self.address.describe(),
                error=error,
                consequence=self.whileUnavailable,
            )
        return Failure(LimitsUnavailable(error))
