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


class IAcceptedMessage(Interface):
    """
    One message being received: DATA lines stream in (dot-unstuffed, without
    their CRLF, already checked by the DATA filter), then either
    C{eomReceived} or C{connectionLost}.
    """

    queueId = Attribute("The queue id (L{str}) allocated for this message.")

    def lineReceived(line):
        """
        One line of the message, L{bytes} without the line ending.  May raise
        L{msa.errors.SMTPReply} to refuse the message (the rest of DATA is
        then read and discarded, and the reply is sent after the final dot).
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


class ICertificateCredentials(Interface):
    """
    SASL EXTERNAL: the identities of the connection's verified client
    certificate, and the authorization identity the client asked for.
    """

    identities = Attribute("L{tuple} of identity strings of the certificate.")
    authzid = Attribute("The requested account name (L{str}); empty for any.")
