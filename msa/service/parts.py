# -*- test-case-name: tests.test_e2e,tests.test_workers,tests.test_limits_redis -*-
"""
Parts of the MSA's service built from its configuration
(L{msa.service.tap.buildService}): where accepted messages go (the core MTA
or the outbox), the relay runner, and the limits shared in Redis.
"""

from __future__ import annotations

from twisted.logger import Logger

from msa import tls
from msa.policy.authorization import AuthThrottle
from msa.policy.redislimits import RedisLimits
from msa.queue.spool import Spool
from msa.relay.client import SMTPDownstream
from msa.relay.outbox import OutboxDownstream
from msa.relay.runner import RelayRunner
from msa.service.config import Config

log = Logger()


def downstreamFrom(config: Config):
    """
    Where accepted messages go: the core MTA of C{[relay]}, or the outbox
    directory when no core is configured.
    """
    relay = config["relay"]
    if not relay["host"]:
        log.warn(
            "No core MTA configured ([relay] host): accepted messages are written "
            "to the outbox {outbox}, one file per message, and not relayed",
            outbox=relay["outbox"],
        )
        return OutboxDownstream(relay["outbox"])
    contextFactory = None
    if relay["tls"] != "none":
        contextFactory = tls.clientContextFactory(
            relay["server_name"],
            caFile=relay["ca_file"],
            clientCertFile=relay["client_certificate"],
            clientKeyFile=relay["client_key"],
            verify=relay["verify_certificate"],
        )
    password = None
    if relay["auth_password_file"]:
        with open(relay["auth_password_file"]) as f:
            password = f.read().strip()
    return SMTPDownstream(
        relay["host"],
        relay["port"],
        tlsMode=relay["tls"],
        contextFactory=contextFactory,
        heloName=relay["helo_name"],
        authUsername=relay["auth_username"],
        authPassword=password,
        connectTimeout=relay["connect_timeout"],
        commandTimeout=relay["command_timeout"],
        dataTimeout=relay["data_timeout"],
        idleTimeout=relay["idle_timeout"],
        maxTransactions=relay["max_messages_per_connection"],
        verifyCertificate=relay["verify_certificate"],
    )


def relayRunnerFrom(config: Config, spool: Spool, reactor) -> RelayRunner:
    """
    The relay runner of C{spool}, to L{downstreamFrom}'s downstream.
    """
    relay = config["relay"]
    return RelayRunner(
        spool,
        downstreamFrom(config),
        reactor,
        retryBase=relay["retry_base"],
        retryMax=relay["retry_max"],
        maxLifetime=relay["max_lifetime"],
        concurrency=relay["concurrency"],
        dsnHostname=config["server"]["hostname"] if relay["send_dsn"] else None,
        delayWarningAfter=relay["delay_warning_after"],
    )


def sharedLimitsFrom(
    config: Config, throttle: AuthThrottle, reactor
) -> RedisLimits | None:
    """
    With C{[limits] backend = "redis"}: the limits every instance shares
    (a service: it keeps the connection and refreshes this instance's holds
    and sessions), else L{None} and each instance counts on its own.
    """
    limits = config["limits"]
    if limits["backend"] != "redis":
        return None
    contextFactory = None
    if limits["address"].tls:
        # rediss://: Redis's certificate verified against the URL's host
        # (R14's rule for the core, applied to every engine we talk to).
        contextFactory = tls.clientContextFactory(
            limits["address"].host,
            caFile=limits["tls_ca"],
            clientCertFile=limits["tls_certificate"],
            clientKeyFile=limits["tls_key"],
        )
    shared = RedisLimits(
        limits["address"],
        prefix=limits["key_prefix"],
        timeout=limits["timeout"],
        lease=limits["lease"],
        throttle=throttle,
        local=limits["fallback"] == "local",
        reactor=reactor,
        contextFactory=contextFactory,
    )
    shared.setName("limits")
    return shared
