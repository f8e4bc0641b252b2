# -*- test-case-name: tests.test_testing,tests.test_sasl -*-
"""
The seams of the MSA: every arrow in DESIGN.md's data flow is one of these
interfaces, so that an embedder can replace any box (its own account store,
realm, content policy, spool or downstream) without touching the others.
"""

from zope.interface import Attribute, Interface


class ISubmission(Interface):
    """
    The avatar a successful AUTH yields from the cred Realm: one authenticated
    account's right to submit messages.  The protocol asks it about every MAIL
    and RCPT and hands it the message once, however many recipients it has.

    Refusals are raised (or returned as a failing Deferred) as
    L{msa.errors.SMTPReply}, whose code, enhanced status and text reach the
    client unchanged.  Any other exception becomes a temporary 451 4.3.0.
    """

    account = Attribute("The account name (L{str}) this avatar submits for.")
    maxMessageSize = Attribute(
        "The account's own message size limit in octets (L{int}), or L{None}: "
        "the session uses the lower of it and the server's."
    )
    maxRecipients = Attribute(
        "The account's own limit of recipients per message (L{int}), or "
        "L{None}: the session uses the lower of it and the server's."
    )
    maxSessions = Attribute(
        "How many sessions the account may have at once (L{int}), or "
        "L{None} for no limit of its own."
    )

    def validateFrom(session, sender, params):
        """
        Decide on C{MAIL FROM}.

        @param session: the L{msa.envelope.SessionInfo} of the connection.
        @param sender: the reverse-path, a complete address L{str}, or C{""}
            for the null sender C{<>}.
        @param params: the MAIL parameters, a L{dict} of upper-case L{str}
            keywords to L{str} values (or L{None}), already checked for syntax.
        @return: L{None} or a L{Deferred} firing with L{None}.
        """

    def validateTo(session, recipient, params):
        """
        Decide on one C{RCPT TO}: same contract as L{validateFrom}.
        """

    def startMessage(session, envelope):
        """
        Begin receiving the message of a complete envelope (after DATA's
        354).

        @param session: the L{msa.envelope.SessionInfo} of the connection.
        @param envelope: L{msa.envelope.Envelope}.
        @return: an L{IAcceptedMessage}.
        """

    def endTransaction():
        """
        The transaction ended (RSET, HELO/EHLO, a new MAIL, the final dot)
        before a message took over what MAIL held for it (a rate slot):
        release it.  Called for every transaction end, also when nothing is
        held.
        """

    def logout():
        """
        The session is over (the realm's logout): release what the avatar
        still holds.
        """


class IAcceptedMessage(Interface):
    """
    One message being received: DATA lines stream in (dot-unstuffed, without
    their CRLF, already checked by the DATA filter), then either
    C{eomReceived} or C{connectionLost}.
    """

    queueId = Attribute("The queue id (L{str}) allocated for this message.")
    acceptsBlocks = Attribute(
        "Whether L{blockReceived} may be used now (L{bool}): not while a "
        "content policy needs to see each line."
    )

    def lineReceived(line):
        """
        One line of the message, L{bytes} without the line ending.  May raise
        L{msa.errors.SMTPReply} to refuse the message (the rest of DATA is
        then read and discarded, and the reply is sent after the final dot).
        """

    def blockReceived(data):
        """
        Several complete lines at once (L{bytes}, each with its CRLF,
        dot-unstuffed, already judged by the DATA filter); offered only
        while L{acceptsBlocks} is true.
        """

    def sha256():
        """
        @return: the hex SHA-256 (L{str}) of the message as accepted from
            the client, without the MSA's own trace header: the digest the
            spool records, for the log.
        """

    def eomReceived():
        """
        The final dot has arrived.  Make the message durable.

        @return: a L{Deferred} firing with the queue id once the message (and
            its envelope) are safely on disk, or failing with
            L{msa.errors.SMTPReply}.  The 250 reply is sent only after it fires.
        """

    def connectionLost():
        """
        The message will not be completed: remove every trace of it.
        """


class ISpool(Interface):
    """
    The durable queue on disk.  It never speaks SMTP.
    """

    queueDirectory = Attribute(
        "The directory of the committed messages (L{str}), or L{None} for a "
        "spool that keeps them elsewhere (L{msa.testing.MemorySpool}): what "
        "tells one spool's counts from another's (L{msa.metrics})."
    )

    def newMessage(envelope):
        """
        Allocate a queue id and open a writer for a new message.

        @param envelope: L{msa.envelope.Envelope}; its C{queueId} is set by
            this call.
        @return: an L{ISpoolWriter}.
        """


class ISpoolWriter(Interface):
    """
    The file of one message being written.
    """

    queueId = Attribute("The queue id (L{str}) of the message.")

    def write(data):
        """
        Append L{bytes} to the message (the caller supplies CRLF endings).
        """

    def writeTrace(data):
        """
        Append the MSA's own trace header (L{bytes}): stored like L{write}'s
        data, but not part of L{sha256}, which covers what the client sent.
        """

    def sha256():
        """
        @return: the hex SHA-256 (L{str}) of the bytes written so far after
            the trace header.
        """

    def noteAudit(**fields):
        """
        Add C{fields} (session, TLS, size, digest ...) to the message's
        acceptance record; a spool without an audit log ignores them.
        """

    def commit():
        """
        Make the message and its envelope durable (fsync the files and the
        directory, atomic rename) and announce it to the queue runner.

        @return: a L{Deferred} firing with the queue id when it is on disk.
        """

    def abort():
        """
        Forget the message; no trace of it remains in the queue.
        """


class IContentPolicy(Interface):
    """
    A content check (R12), run on every message while it streams in.
    """

    def startMessage(envelope):
        """
        @return: a per-message L{msa.policy.content.IContentChecker} (the header
            section arrives once, parsed, in C{headersReceived}, then body
            lines, then C{eomReceived}; each may raise
            L{msa.errors.SMTPReply}), or L{None} to skip this message.
        """


class IAccountStore(Interface):
    """
    Where accounts come from (a file by default; LDAP or SQL for an embedder).
    """

    def getAccount(name):
        """
        @param name: the account name, L{str}.
        @return: an L{msa.accounts.model.Account}, or L{None} when unknown.
        """


class ILiveAccountStore(IAccountStore):
    """
    An account store a running MSA serves logins from and keeps current:
    the file (L{msa.accounts.filestore.AccountFile}) or a database
    (L{msa.accounts.pgstore.AccountDatabase}).  The checkers and the realm
    need only L{IAccountStore} and C{accounts}.
    """

    def accounts():
        """
        @return: every L{msa.accounts.model.Account} (for look-ups by another
            key, such as a client certificate).
        """

    def scramParameters(username, mechanism):
        """
        @return: the salt (L{bytes}) and iteration count of C{username}'s
            C{mechanism} secrets, or L{None}.
        """

    def reload():
        """
        Look for changes now (SIGHUP).  A failure is logged and the accounts
        read last are kept.

        @return: whether new accounts were loaded, or a L{Deferred} of it.
        """

    def startWatching(interval):
        """
        Look for changes every C{interval} seconds.
        """

    where = Attribute(
        "Where the accounts come from (L{str}: the file's path, the "
        "database's URL without its password), for C{/health} and the log."
    )
    outage = Attribute(
        "Why the accounts cannot be read now (L{str}), while logins go on "
        "from the last good copy; L{None} while they can.  A file is never "
        "unreachable that way: always L{None}."
    )

    def stopWatching():
        """
        Stop looking for changes.

        @return: L{None}, or a L{Deferred} firing once stopped.
        """


class IDigestMD5Credentials(Interface):
    """
    Credentials from a DIGEST-MD5 exchange (RFC 2831): the server checks the
    client's response against the stored H(A1) of the account.
    """

    username = Attribute("The user name (L{str}) from the response.")
    realm = Attribute("The realm (L{str}) from the response.")
    mechanism = Attribute("C{'DIGEST-MD5'}.")

    def checkHA1(ha1):
        """
        @param ha1: the 16 raw bytes of MD5(username:realm:password).
        @return: L{True} when the response was computed from that secret.
        """


class IScramCredentials(Interface):
    """
    Credentials from a SCRAM exchange (RFC 5802): checked against the stored
    StoredKey and ServerKey, never against a password.
    """

    username = Attribute("The user name (L{str}).")
    mechanism = Attribute("The mechanism name, e.g. C{'SCRAM-SHA-256'}.")

    def checkKeys(storedKey, serverKey):
        """
        @return: L{True} when the client proof matches C{storedKey}; the
            server signature for the final message is derived from
            C{serverKey}.
        """


class IMechanismCredentials(Interface):
    """
    Every credential object the SASL mechanisms produce also says which
    mechanism produced it, so that the checker can enforce the mechanisms an
    account is allowed to use.
    """

    mechanism = Attribute("Upper-case mechanism name, L{str}.")
    username = Attribute(
        "The user name the client gave (L{str}); for EXTERNAL the requested "
        "authorization identity, empty for any.  Logged and throttled by."
    )


class ICertificateCredentials(Interface):
    """
    SASL EXTERNAL: the identities of the connection's verified client
    certificate, and the authorization identity the client asked for.
    """

    identities = Attribute("L{tuple} of identity strings of the certificate.")
    authzid = Attribute("The requested account name (L{str}); empty for any.")


class IRateLimiter(Interface):
    """
    Messages per minute and per day for each account (R10), kept in memory
    per instance (L{msa.policy.authorization.RateLimiter}) or shared by
    every instance (L{msa.policy.redislimits.RedisRateLimiter}).
    """

    def reserve(account, rules):
        """
        Check the account's rates and hold one message slot, in one step,
        so that concurrent sessions cannot all pass the check.

        @param account: the account name, L{str}.
        @param rules: its L{msa.policy.authorization.AccountRules}.
        @return: an L{IRateReservation}, or a L{Deferred} firing with one
            (the memory limiter answers at once, without a L{Deferred}).
        @raise msa.errors.SMTPReply: (or fail with it) C{451 4.7.1} past
            a limit; C{451 4.3.0} when the limits cannot be checked now.
        """

    def record(account):
        """
        Count a message that was not reserved (MAIL judged by an
        embedder's protocol).
        """


class IRateReservation(Interface):
    """
    One message slot held by L{IRateLimiter.reserve}.  Only the first of
    L{commit} and L{release} has an effect; neither waits for anything.
    """

    account = Attribute("The account name (L{str}).")

    def commit():
        """
        The message is queued: it counts against the account's rates.
        """

    def release():
        """
        The transaction ended without a queued message.
        """


class IAuthThrottle(Interface):
    """
    The escalating delay before a failed login's reply, per client address
    and per (account, client address).
    """

    base = Attribute("Delay after the first failure, seconds.")
    maximum = Attribute("The longest delay, seconds.")

    def failedLogin(clientAddress, account):
        """
        Count a failed login and say how long to wait before answering it.

        @return: the delay in seconds (L{float}), or a L{Deferred} firing
            with it; fails with L{msa.errors.LimitsUnavailable} when the
            count cannot be kept.
        """

    def succeededLogin(clientAddress, account):
        """
        Forget the failures of (account, client address).

        @return: L{None}, or a L{Deferred}; fails with
            L{msa.errors.LimitsUnavailable} as L{failedLogin}.
        """


class ISessionLimiter(Interface):
    """
    Concurrent sessions per account (C{maxSessions}).
    """

    def acquire(account, maximum, sessionId):
        """
        Count session C{sessionId} as one of C{account}'s, unless it
        already has C{maximum}.

        @return: whether the session may go on (L{bool}), or a L{Deferred}
            firing with it; fails with L{msa.errors.LimitsUnavailable}
            when the count cannot be kept.
        """

    def release(account, sessionId):
        """
        The session acquired by L{acquire} is over.
        """


class IMailboxStore(Interface):
    """
    Where return messages wait for their company (R16): the core MTA delivers
    them over LMTP (L{deliver}), the company fetches them over POP3
    (L{open}).  The default keeps a Maildir per account under the state
    directory; a PostgreSQL store serves several instances.  It never speaks
    a protocol.
    """

    def deliver(account, source, size, sha256, auditFields=None):
        """
        Store one message durably in C{account}'s mailbox, with its
        C{mailbox-delivered} audit record.

        @param account: the account name, L{str}.
        @param source: a readable binary file positioned at the message's
            first byte (CRLF line endings, not dot-stuffed); the store copies
            or links it and never keeps a reference.
        @param size: the message's length in octets.
        @param sha256: the hex SHA-256 of the message, kept with it.
        @param auditFields: a L{dict} of fields added to the delivery's
            audit record (the LMTP sender and recipient), or L{None}.
        @return: a L{Deferred} firing with the message's unique id (L{str},
            stable across restarts, never reused) once it is on disk
            (fsynced, directory entry included); failing with
            L{msa.errors.SMTPReply} (a 452 when over quota, a 451 on a disk
            error) when it is not.
        """

    def open(account):
        """
        Lock C{account}'s mailbox for one POP3 session and take its snapshot.

        @return: a L{Deferred} firing with an L{IMailbox}, or failing with
            L{msa.errors.MailboxInUse} when another session holds the lock.
        """

    def close():
        """
        The daemon stops: release what the store holds beyond its mailboxes
        (a database store's threads and connections), after the work under
        way.

        @return: a L{Deferred} firing once released.
        """


class IMailbox(Interface):
    """
    One locked mailbox as a POP3 session sees it: the snapshot taken at
    L{IMailboxStore.open}, in delivery order.  Nothing changes on disk until
    L{commitDeletions}; L{release} without it changes nothing.
    """

    account = Attribute("The account name (L{str}).")

    def messages():
        """
        @return: a L{list} of L{msa.envelope.StoredMessage} (uid, size), in
            delivery order; a POP3 message number is its index plus one.
        """

    def openMessage(uid):
        """
        @param uid: a uid from L{messages} (never one of another account).
        @return: a L{Deferred} firing with a readable binary file of the
            message (the caller closes it and reads it in blocks; it is
            never loaded whole).
        """

    def commitDeletions(uids):
        """
        Remove the messages durably (the POP3 UPDATE state): after the
        L{Deferred} fires, each is gone and a crash cannot bring it back;
        a crash before leaves each either gone or whole.

        @param uids: the uids to delete, a L{list} of L{str}.
        @return: a L{Deferred} firing with L{None}.
        """

    def release():
        """
        Give the lock up (the session ended, cleanly or not).
        """


# -- the relay ------------------------------------------------------------


class IDownstream(Interface):
    """
    Where the relay's queue runner hands messages
    (L{msa.relay.runner.RelayRunner}): the core MTA over SMTP
    (L{msa.relay.client.SMTPDownstream}), or an outbox directory
    (L{msa.relay.outbox.OutboxDownstream}) when no core MTA is configured.
    """

    host = Attribute(
        "The remote host (L{str}) the delivery status notifications name "
        'as their C{Remote-MTA}; C{""} for none (the outbox).'
    )

    def deliver(entry, messageFile, dataSent=None):
        """
        Deliver C{entry}'s message to its pending recipients.

        @param entry: the L{msa.queue.entry.SpoolEntry}.
        @param messageFile: its message (the trace header, then the
            message), open for binary reading.
        @param dataSent: L{None}, or called (with no argument) once the
            whole message is sent and what carried it can take the next
            message while this one waits for its reply (a connection to a
            core that offers PIPELINING): the runner may start the next
            delivery then.  A downstream may never call it.
        @return: a L{Deferred} of the L{msa.relay.results.DeliveryResult}.
        """

    def close():
        """
        Close what is kept open between deliveries (idle connections);
        called once the runner has stopped.

        @return: L{None}, or a L{Deferred} firing once closed.
        """


class IRelay(Interface):
    """
    The queue runner (L{msa.relay.runner.RelayRunner}) as C{/health} sees
    it.
    """

    unremovable = Attribute(
        "The entries the core has decided about but whose new state the "
        "spool could not record (never sent again by this process): a "
        "L{dict} of queue id to the reason."
    )
