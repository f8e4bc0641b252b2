# -*- test-case-name: tests.test_e2e,tests.test_everykey,tests.test_filestore -*-
"""
C{twistd digipoort-msa}: command-line options and L{makeService}, which turns
a configuration into the running MSA (listeners, account store, spool and
relay runner) as one L{OrderedShutdown}.  An embedder that has its own Twisted
application calls L{buildService} with a L{msa.service.config.Config}, or builds a
L{msa.submission.server.SubmissionFactory} itself.
"""

import os

import attrs
from twisted.application import strports
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import (
    Logger,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from msa import __version__, metrics, tls
from msa.accounts.checkers import AccountChecker, SubmissionRealm
from msa.accounts.clientcert import CertificateBindingRealm, CertificateChecker
from msa.accounts.filestore import AccountFile
from msa.accounts.model import (
    AccountsFileError,
    makeAccount,
    verifyHash,
    writeAccounts,
)
from msa.accounts.passwords import PasswordVerifier, limitScryptMemory
from msa.accounts.pgstore import AccountDatabase
from msa.audit import AuditLog
from msa.interfaces import ILiveAccountStore, ISessionLimiter
from msa.policy.authorization import AuthThrottle, ServerRules
from msa.policy.keptlimits import LimitsKeeper
from msa.policy.redislimits import RedisLimits
from msa.policy.workerlimits import WorkerLimits
from msa.redact import maskSecrets
from msa.sasl import MechanismContext
from msa.sasl.scram import setFakeSaltSecret
from msa.service import logs
from msa.service.backlog import checkBacklog, withBacklog
from msa.service.config import Config, ConfigError, loadConfig
from msa.service.controlsocket import ControlService, socketPath
from msa.service.forked import ParkedWorker, parkWorkers
from msa.service.heaptrim import HeapTrim
from msa.service.parts import relayRunnerFrom, sharedLimitsFrom
from msa.service.pop3service import addPOP3Listeners
from msa.service.returnchannel import buildReturnChannel
from msa.service.services import (
    AccountWatcher,
    AuditLogService,
    JSONLogFile,
    LogLevelFilter,
    OrderedShutdown,
    SessionShutdown,
    openSpool,
)
from msa.service.startupchecks import StartupCheckError, checkFileLimit, runChecks
from msa.service.supervisor import Workers, WorkersGone
from msa.service.workers import AdoptedListener, KeptPort, relayLeftovers
from msa.submission.avatar import submissionFactory
from msa.submission.extensions import offeredExtensions
from msa.submission.proxyheader import (
    ProxyAllowlist,
    ProxyHeaderFactory,
    splitDescription,
)
from msa.submission.server import ServerPolicy, SubmissionFactory
from msa.submission.sessions import MemorySessionLimiter, SessionRegistry

log = Logger()

#: The account made on a first start with built-in defaults (README.rst).
DEMO_ACCOUNT = ("demo", "demo-password")
DEMO_SENDERS = ("@mijnbedrijf.nl", "@example.nl")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Digipoort SMTP Message Submission Agent.  Without --config it runs on "
        "built-in defaults: 127.0.0.1 ports 2587 (STARTTLS) and 2465 (implicit "
        "TLS), state under ./msa-state, accepted mail to ./msa-state/outbox."
    )
    optParameters = [
        ["config", "c", None, "Configuration file (TOML); see etc/digipoort-msa.toml."],
    ]

    def opt_version(self):
        print(f"digipoort-msa {__version__}")
        raise SystemExit(0)


def configFromOptions(options: Options) -> Config:
    """
    The configuration C{--config} names (or the built-in defaults).

    @raise SystemExit: with one line naming the file and the key at fault
        (passwords in URLs masked), which twistd prints, exiting 1, without
        a traceback.
    """
    try:
        return loadConfig(options["config"])
    except ConfigError as e:
        line = " ".join(maskSecrets(str(e)).splitlines())
        raise SystemExit("digipoort-msa: " + line) from None


#: What stops a start with one line (no traceback).
STARTUP_ERRORS = (
    StartupCheckError,
    ConfigError,
    AccountsFileError,
    tls.TLSConfigurationError,
    OSError,
    ValueError,
)


def makeService(options: Options) -> OrderedShutdown:
    limitScryptMemory()
    config = configFromOptions(options)
    # Now, before the reactor: forked workers share this process's modules.
    parked = parkWorkers(range(1, config["server"]["workers"]))
    try:
        return buildService(config, parked=parked)
    except BaseException as e:
        for worker in parked.values():
            worker.discard()
        if not isinstance(e, STARTUP_ERRORS):
            raise
        # A configuration error may quote a connection string: never its
        # password (nor a traceback of the chained error that holds it).
        raise SystemExit(
            f"digipoort-msa: cannot start: {maskSecrets(str(e))}"
        ) from None


def _ensureDemoAccounts(config: Config) -> None:
    """
    On built-in defaults only: make an accounts file with the demo account
    when there is none, so that a first start can be tried at once.
    """
    path = config.accountsFile
    if not config.usesDefaults or os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    name, password = DEMO_ACCOUNT
    account = makeAccount(name, password, [config.realm])
    account = attrs.evolve(account, extra={"senders": list(DEMO_SENDERS)})
    writeAccounts(path, {name: account})
    log.warn(
        "Made {path} with the demo account {name!r} (its password is in "
        "README.rst) because the MSA runs on built-in defaults; do not use it "
        "in production",
        path=path,
        name=name,
    )


def _accountStore(config: Config, reactor) -> ILiveAccountStore:
    """
    The accounts file, or the database C{[accounts] store} names.
    """
    url = config["accounts"]["store"]
    if url != "file":
        cache = os.path.join(config["server"]["state_dir"], "accounts-cache.json")
        return AccountDatabase(url, reactor, cacheFile=cache)
    _ensureDemoAccounts(config)
    return AccountFile(config.accountsFile, reactor)


def buildService(
    config: Config,
    reactor=None,
    listeners: dict[str, int] | None = None,
    parked: dict[int, ParkedWorker] | None = None,
    limitsChannel: int | None = None,
) -> OrderedShutdown:
    """
    Everything the MSA runs, from a validated configuration.

    The services are added in the order they may start, which
    L{OrderedShutdown} stops in reverse, one after the other: the other
    workers (L{msa.service.workers}), the listeners, the sessions
    (finishing their messages), the relay runner, the control socket and
    metrics, the limits, the accounts, the audit log, the logs.

    @param listeners: in a worker other than worker 0
        (L{msa.service.worker}), the listening sockets it was given, by
        C{"<key>:<position>"} (C{"starttls_listeners:0"}): it accepts on
        them instead of binding its own, and runs no return channel.
    @param parked: in worker 0, the workers forked before the reactor
        (L{msa.service.forked.parkWorkers}), for their first start.
    @param limitsChannel: in a worker other than worker 0, with C{[limits]
        backend = "memory"}: the descriptor over which it asks worker 0 for
        the limits (L{msa.policy.workerlimits}).
    """
    if reactor is None:
        from twisted.internet import reactor
    server, tlsConfig = config["server"], config["tls"]
    try:
        proxyFrom = ProxyAllowlist.parse(server["proxy_from"])
    except ValueError as e:
        raise ConfigError(f"[server] proxy_from: {e}") from None
    top = OrderedShutdown()
    # First, so that it is in place before the other services log, and
    # stops last, after everything they log while they stop.
    level = logs.LEVELS[config["logging"]["level"]]
    LogLevelFilter(level).setServiceParent(top)
    if config["logging"]["json_file"]:
        JSONLogFile(config["logging"]["json_file"], level).setServiceParent(top)
    workers = None
    if server["workers"] > 1 and listeners is None:
        workers = Workers(
            server["workers"],
            config.path,
            [],
            reactor,
            server["shutdown_grace"],
            parked=parked,
        )
        # Early, so that it stops late: the workers end beside this one.
        WorkersGone(workers).setServiceParent(top)
    os.makedirs(server["state_dir"], mode=0o700, exist_ok=True)

    certFile, keyFile = tlsConfig["certificate"], tlsConfig["key"]
    if certFile is None:
        certFile, keyFile = tls.ensureSelfSignedCertificate(
            server["state_dir"], server["hostname"]
        )
    # The same fake SCRAM salts in every worker and instance with this key.
    with open(keyFile, "rb") as f:
        setFakeSaltSecret(f.read())
    tlsArgs = {
        k: v
        for k, v in (
            ("ciphers", tlsConfig["ciphers"]),
            ("groups", tlsConfig["groups"]),
            ("minimumVersion", tlsConfig["minimum_version"]),
        )
        if v is not None
    }
    contextFactory = tls.serverContextFactory(
        certFile,
        keyFile,
        tlsConfig["chain"],
        clientCertificates=tlsConfig["client_certificates"],
        clientCAFile=tlsConfig["client_ca"],
        clientCRLFile=tlsConfig["client_crl"],
        ocspResponseFile=tlsConfig["ocsp_response"],
        **tlsArgs,
    )

    store = _accountStore(config, reactor)
    watcher = AccountWatcher(store, config["accounts"]["watch_interval"])

    spoolDirectory = config["spool"]["directory"]
    spool = openSpool(config, spoolDirectory, server["state_dir"], reactor)
    runChecks(certFile, tlsConfig["chain"], spoolDirectory)
    spool.recover()
    audit = None
    if config["audit"]["enabled"]:
        audit = AuditLog(
            config["audit"]["path"], config["audit"]["max_bytes"], reactor=reactor
        )
        AuditLogService(spool, audit, reactor).setServiceParent(top)
    watcher.setServiceParent(top)
    relay = config["relay"]
    for problem in checkFileLimit(server["max_connections"], relay["concurrency"]):
        log.warn("startup check: {problem}", problem=problem)
    runner = relayRunnerFrom(config, spool, reactor)
    throttle = AuthThrottle(
        base=server["auth_delay_base"], maximum=server["auth_delay_max"]
    )
    sharedLimits: RedisLimits | WorkerLimits | None
    if limitsChannel is not None:
        sharedLimits = WorkerLimits(
            limitsChannel, reactor, throttle, config["limits"]["timeout"]
        )
    else:
        sharedLimits = sharedLimitsFrom(config, throttle, reactor)
    if sharedLimits is not None:
        sharedLimits.setServiceParent(top)
    metrics.watchQueue(spool, relay["delay_warning_after"])
    metrics.watchCertificate(certFile)
    contextArgs = dict(certFile=certFile, keyFile=keyFile, chainFile=tlsConfig["chain"])
    returnChannel = None
    if listeners is None:
        returnChannel = buildReturnChannel(
            config, store, audit, contextArgs | tlsArgs, reactor
        )
        returnChannel.setServiceParent(top)
    if config["metrics"]["listen"]:
        # Imported here: twisted.web is some 3 MB that a server without a
        # metrics listener does not need (bench/RESULTS.md, memory).
        from twisted.web.server import Site

        from msa.service.health import Health, healthSite

        health = Health(
            spool,
            runner,
            config["metrics"]["health_window"],
            limits=sharedLimits,
            accounts=store,
            audit=spool.audit,
            returnChannel=returnChannel,
            workers=workers,
        )
        site = Site(healthSite(health))
        # strports.service: a port that cannot be bound fails the start.
        metricsService = strports.service(config["metrics"]["listen"], site, reactor)
        metricsService.setServiceParent(top)
    ControlService(
        socketPath(server["state_dir"]), runner.control, spool, reactor, audit
    ).setServiceParent(top)
    runner.setServiceParent(top)
    if listeners is None:
        for leftover in relayLeftovers(config, audit, reactor, relayRunnerFrom):
            leftover.setServiceParent(top)

    if server["accepted_recipients"] is None:
        log.warn(
            "No [server] accepted_recipients configured: any recipient is accepted; "
            "a gateway into Digipoort should name the domains it serves"
        )
    serverRules = ServerRules(
        recipients=server["accepted_recipients"], throttle=throttle
    )
    if sharedLimits is not None:
        serverRules.rates = sharedLimits.rates
        serverRules.throttle = sharedLimits.throttle
    realm = CertificateBindingRealm(
        SubmissionRealm(
            store,
            submissionFactory(
                spool, server["hostname"], serverRules, config["content"]["chain"]
            ),
        ),
        store,
    )
    verifier = PasswordVerifier(
        verifyHash, ttl=config["accounts"]["auth_cache_ttl"], reactor=reactor
    )
    portal = Portal(
        realm, [AccountChecker(store, verifier=verifier), CertificateChecker(store)]
    )
    mechanismContext = MechanismContext(
        realm=server["sasl_realm"],
        serverNames=list(server["server_names"]),
        scramParameters=store.scramParameters,
    )
    registry = SessionRegistry()
    sessionLimiter: ISessionLimiter | None = None
    if sharedLimits is not None:
        sessionLimiter = sharedLimits.sessions
        if sharedLimits.fallback == "local":
            sessionLimiter.local = MemorySessionLimiter(registry)
    elif workers is not None:
        # Worker 0 counts for every worker (they ask it): the sessions of
        # all of them against each account's limit.
        keeper = LimitsKeeper(serverRules.rates, serverRules.throttle, registry)
        workers.keeper = keeper
        sessionLimiter = MemorySessionLimiter(keeper)
    checkBacklog(server["listen_backlog"])
    SessionShutdown(registry, server["shutdown_grace"]).setServiceParent(top)
    HeapTrim(registry, reactor).setServiceParent(top)
    for implicit, key in (
        (False, "starttls_listeners"),
        (True, "implicit_tls_listeners"),
    ):
        policy = ServerPolicy(
            hostname=server["hostname"],
            implicitTLS=implicit,
            maxMessageSize=server["max_message_size"],
            maxLineLength=server["max_line_length"],
            maxRecipients=server["max_recipients"],
            maxErrors=server["max_errors"],
            maxAuthFailures=server["max_auth_failures"],
            idleTimeout=server["idle_timeout"],
            tlsHandshakeTimeout=server["tls_handshake_timeout"],
            commandLineTimeout=server["command_line_timeout"],
            loginTimeout=server["login_timeout"],
            dataTimeout=server["data_timeout"],
            dataMinRate=server["data_min_rate"],
            maxConnections=server["max_connections"],
            maxConnectionsPerClient=server["max_connections_per_client"],
            mechanisms=tuple(server["mechanisms"]),
            extensions=offeredExtensions(server["extensions"]),
        )
        factory = SubmissionFactory(
            portal,
            policy,
            tlsContextFactory=contextFactory,
            mechanismContext=mechanismContext,
            registry=registry,
            authThrottle=serverRules.throttle,
            reactor=reactor,
            sessionLimiter=sessionLimiter,
        )
        served: IProtocolFactory = factory
        if implicit:
            served = TLSMemoryBIOFactory(contextFactory, False, factory)
        for position, description in enumerate(server[key]):
            proxied, inner = splitDescription(description)
            listenerFactory = served
            if proxied:
                listenerFactory = ProxyHeaderFactory(
                    served, reactor, proxyFrom, description
                )
            listenerKey = f"{key}:{position}"
            if listeners is not None:
                AdoptedListener(
                    listeners[listenerKey], listenerFactory, reactor
                ).setServiceParent(top)
                continue
            # A listener that cannot bind fails the start (twistd exits).
            listener = strports.service(
                withBacklog(inner, server["listen_backlog"]), listenerFactory, reactor
            )
            if workers is not None:
                kept = KeptPort(listener.endpoint, listenerKey)
                listener.endpoint = kept
                workers.ports.append(kept)
            listener.setServiceParent(top)
    if returnChannel is not None:
        addPOP3Listeners(
            top,
            config,
            reactor,
            portal,
            store,
            returnChannel.mailboxStore,
            audit,
            serverRules.throttle,
            contextFactory,
            mechanismContext,
        )
    if workers is not None:
        # Last: the listening sockets are bound when it starts, and it
        # stops first, telling the workers to stop beside this one.
        workers.setServiceParent(top)
    return top
