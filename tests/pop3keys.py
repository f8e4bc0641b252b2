"""
The checks of the C{[pop3]} rows of L{tests.test_everykey}: each shows its
key's effect over a real socket (blocking: the rows' checks run in a
thread).  The POP3 ports are the group's C{env.port("pop3")} and
C{env.port("pop3s")}.
"""

import poplib
import socket

from tests.e2e import USERS

GREETING = b"+OK localhost POP3 ready\r\n"


def port(env) -> int:
    """
    The STLS listener's port: the row's own in the group that sets it,
    else the one L{tests.e2e.RunningMSA} chose.
    """
    if "pop3.starttls_listeners" in env.values:
        return env.port("pop3")
    return env.msa.pop3Port


def starttlsListener(env) -> list[str]:
    return [f"tcp:{env.port('pop3')}:interface=127.0.0.1"]


def implicitListener(env) -> list[str]:
    return [f"tcp:{env.port('pop3s')}:interface=127.0.0.1"]


def _stls(env) -> poplib.POP3:
    client = poplib.POP3("localhost", port(env), timeout=10)
    client.stls(env.msa.clientContext())
    return client


def checkStartTLSListener(env) -> None:
    client = _stls(env)
    client.user("alice")
    assert client.pass_(USERS["alice"]).startswith(b"+OK"), "no login"
    client.quit()


def checkImplicitListener(env) -> None:
    client = poplib.POP3_SSL(
        "localhost", env.port("pop3s"), context=env.msa.clientContext(), timeout=10
    )
    client.user("alice")
    assert client.pass_(USERS["alice"]).startswith(b"+OK"), "no login"
    client.quit()


def _capa(env) -> list[bytes]:
    client = _stls(env)
    try:
        return client._longcmd("CAPA")[1]
    finally:
        client.quit()


def checkMechanisms(env) -> None:
    capa = _capa(env)
    assert b"SASL PLAIN" in capa, capa


def checkExpire(env) -> None:
    capa = _capa(env)
    assert b"EXPIRE 30" in capa, capa


def lines(port: int, count: int, send: bytes = b"") -> list[bytes]:
    """
    L{tests.test_everykey.rawLines} (imported when called: that module
    imports this one).
    """
    from tests.test_everykey import rawLines

    return rawLines(port, count, send)


def checkLineLength(env) -> None:
    # 280 octets: over RFC 2449's 255, under the configured 300.
    got = lines(port(env), 2, b"NOOP " + b"x" * 273 + b"\r\n")
    assert got == [GREETING, b"-ERR Command not available here\r\n"], got


def checkErrors(env) -> None:
    got = lines(port(env), 4, b"XYZ\r\nXYZ\r\nCAPA\r\n")
    assert got == [
        GREETING,
        b"-ERR Command not available here\r\n",
        b"-ERR Command not available here; too many errors, closing connection\r\n",
    ], got


def checkAuthFailures(env) -> None:
    client = _stls(env)
    client.user("alice")
    try:
        client.pass_("wrong")
    except poplib.error_proto as e:
        assert e.args[0] == b"-ERR [AUTH] Authentication failed", e
    else:
        raise AssertionError("a wrong password logged in")
    # The session is over after one failure.
    assert client.file.readline() == b"", "still open"
    client.close()


def checkIdleTimeout(env) -> None:
    got = lines(port(env), 3)
    assert got == [GREETING, b"-ERR Idle timeout, closing connection\r\n"], got


def checkLoginTimeout(env) -> None:
    with socket.create_connection(("127.0.0.1", port(env)), 10) as s:
        # A command resets the idle deadline, not this one.
        s.sendall(b"CAPA\r\n")
        got = s.makefile("rb").read()
    assert got.endswith(b"-ERR Login timeout, closing connection\r\n"), got


def _limit(env, refused: bytes) -> None:
    held = []
    try:
        s = socket.create_connection(("127.0.0.1", port(env)), 10)
        held.append(s)
        assert s.makefile("rb").readline() == GREETING
        got = lines(port(env), 2)
        assert got == [refused], got
    finally:
        for s in held:
            s.close()


def checkConnectionLimit(env) -> None:
    _limit(env, b"-ERR [SYS/TEMP] Too many connections\r\n")


def checkConnectionLimitAcrossListeners(env) -> None:
    """
    C{max_connections} counts both listeners together: with one connection
    open on the implicit-TLS port, the STLS port refuses the next.
    """
    held = poplib.POP3_SSL(
        "localhost", env.msa.pop3sPort, context=env.msa.clientContext(), timeout=10
    )
    try:
        assert held.getwelcome() == GREETING.rstrip(b"\r\n")
        got = lines(port(env), 2)
        assert got == [b"-ERR [SYS/TEMP] Too many connections\r\n"], got
    finally:
        held.close()
