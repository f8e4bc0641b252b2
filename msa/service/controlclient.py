# -*- test-case-name: tests.test_controlsocket,tests.test_admin -*-
"""
The client side of the control socket (L{msa.service.controlsocket}, the
server side): where the socket is, its name made to fit a socket address,
and L{request}, the blocking client the admin command uses.
"""

from __future__ import annotations

import json
import os
import socket

#: The socket's name in the state directory.
SOCKET_NAME = "control.sock"


class ControlError(Exception):
    """
    The server (or the spool) refused a command; the message says why.
    """


class ServerNotRunning(ControlError):
    """
    Nothing listens on the control socket.
    """


class NoSuchMessage(ControlError):
    """
    The queue has no message with that id (L{noSuchMessage}).
    """


def noSuchMessage(queueId: str | None) -> NoSuchMessage:
    """
    The error, and its text on the socket, for a queue id the queue does
    not hold.
    """
    return NoSuchMessage(f"no message {queueId} in the queue")


def socketPath(stateDirectory: str) -> str:
    return os.path.join(stateDirectory, SOCKET_NAME)


#: A UNIX socket address holds about 107 bytes.
_MAX_ADDRESS = 100


class _Address:
    """
    A name for the socket at C{path} that fits in a socket address: the
    path itself, or, when it is too long (a deep state directory), the
    path through C{/proc/self/fd/N} of the directory, opened (Linux).
    Close it when the name is no longer needed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        if len(os.fsencode(path)) > _MAX_ADDRESS and os.path.isdir("/proc/self/fd"):
            directory, name = os.path.split(os.path.abspath(path))
            self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            self.path = f"/proc/self/fd/{self._fd}/{name}"

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def request(
    path: str, command: str, queueId: str | None = None, timeout: float = 30
) -> object:
    """
    Send one command to the running MSA and wait for its reply (blocking).

    @return: the result.
    @raise ServerNotRunning: when nothing listens on C{path}.
    @raise NoSuchMessage: when the queue has no message C{queueId}.
    @raise ControlError: when the server refused the command otherwise.
    """
    line = command if queueId is None else f"{command} {queueId}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            address = _Address(path)
        except FileNotFoundError as e:
            raise ServerNotRunning(f"the MSA is not running ({path}: {e.strerror})")
        try:
            s.connect(address.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ServerNotRunning(f"the MSA is not running ({path}: {e.strerror})")
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}")
        finally:
            address.close()
        s.sendall(line.encode("utf-8") + b"\r\n")
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise ControlError(f"no answer from the MSA within {timeout}s")
            if not chunk:
                raise ControlError("the MSA closed the control connection")
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        error = reply.get("error") or "failed"
        if queueId is not None and error == str(noSuchMessage(queueId)):
            raise noSuchMessage(queueId)
        raise ControlError(error)
    return reply.get("result")
