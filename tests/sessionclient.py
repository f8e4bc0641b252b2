"""
A raw, blocking SMTP client over a real socket (run it in a thread), for
tests that must send exactly the bytes they choose: pipelined input, input
after the server's last reply, an abrupt close after the final dot, fuzzed
sessions.  Also how such a test finds the assembled service's sessions.
"""

import base64
import socket
import ssl

from msa.service.services import SessionShutdown


class Closed(Exception):
    """
    The server closed the connection (or it broke) before a whole reply.
    """


class RawSession:
    """
    One connection: STARTTLS or implicit TLS, replies read as they come.

    @ivar replies: every reply line read so far, without CRLF.
    """

    def __init__(self, port: int, context: ssl.SSLContext, implicit: bool = False):
        self.context = context
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if implicit:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self._buffer = b""
        self.replies: list[bytes] = []
        self.eof = False

    def settimeout(self, seconds: float) -> None:
        self.sock.settimeout(seconds)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _readLine(self) -> bytes:
        while b"\r\n" not in self._buffer:
            if self.eof:
                raise Closed(self._buffer)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError) as e:
                self.eof = True
                raise Closed(repr(e))
            if not data:
                self.eof = True
                raise Closed(self._buffer)
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        self.replies.append(line)
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        """
        Read one (possibly multi-line) reply.

        @return: its code and its lines (without code and separator).
        """
        lines = []
        while True:
            line = self._readLine()
            lines.append(line[4:])
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, line: bytes) -> bytes:
        """
        Send one command; return its reply's last line, code included.
        """
        self.send(line + b"\r\n")
        self.reply()
        return self.replies[-1]

    def secure(self, implicit: bool = False) -> None:
        """
        Read the greeting, start TLS unless it is implicit, and EHLO in TLS.
        """
        self.reply()
        if not implicit:
            self.command(b"EHLO client.example.nl")
            assert self.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
            self.sock = self.context.wrap_socket(self.sock, server_hostname="localhost")
        self.command(b"EHLO client.example.nl")

    def login(self, user: bytes = b"alice", password: bytes = b"wonderland") -> bytes:
        token = base64.b64encode(b"\0" + user + b"\0" + password)
        return self.command(b"AUTH PLAIN " + token)

    def readUntilClosed(self) -> list[bytes]:
        """
        Every further reply line until the server closes.
        """
        lines = []
        try:
            while True:
                lines.append(self._readLine())
        except (Closed, TimeoutError, OSError):
            pass
        return lines

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def sessionRegistry(service):
    """
    The L{msa.submission.sessions.SessionRegistry} of an assembled service.
    """
    [shutdown] = [s for s in service if isinstance(s, SessionShutdown)]
    return shutdown.registry
