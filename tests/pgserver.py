"""
A throwaway PostgreSQL server for tests: Debian's binaries
(C{/usr/lib/postgresql/<version>/bin}), a cluster in a temporary directory
owned by an unprivileged user (initdb refuses to run as root: under root
it runs as C{postgres}), listening on 127.0.0.1 on a free port with trust
authentication, and a Unix socket in the same temporary directory.
Stopped and removed in the test's cleanup.
"""

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest

from tests.e2e import freePort
from tests.waiting import waitUntilBlocking

#: The database and superuser every server has.
DATABASE = USER = "msa"

#: The data directory of the cluster each server copies (L{PostgreSQLServer._template}).
_TEMPLATE: str | None = None


def _scratchDirectory() -> str | None:
    """
    Where the clusters go: C{/dev/shm} (memory) when there is one, else
    the default temporary directory.  A cluster is about a thousand
    files; creating them on a disk's file system took a second of system
    time per server (a copy in memory a tenth of that), and nothing here
    needs them to outlive the machine.
    """
    if os.access("/dev/shm", os.W_OK | os.X_OK):
        return "/dev/shm"
    return None


def binDirectory(testCase) -> str:
    """
    The newest Debian PostgreSQL binaries, or skip (under CI=true: fail).
    """
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if not found:
        if os.environ.get("CI") == "true":
            testCase.fail(
                "postgresql is not installed (CI must install it: see run-tests.sh)"
            )
        raise SkipTest("postgresql not installed")
    return os.path.dirname(found[-1])


class PostgreSQLServer:
    """
    One cluster: L{start}ed at construction, L{stop}ped (and removed) in the
    test's cleanup.  L{stop} and L{start} again keep the data and the port,
    for tests of an outage.

    @ivar url: C{postgresql://msa@127.0.0.1:<port>/msa}.
    """

    def __init__(self, testCase) -> None:
        self.bin = binDirectory(testCase)
        self.port = freePort()
        # Not in the trial directory: the unprivileged user must be able
        # to reach it.
        self.directory = tempfile.mkdtemp(prefix="msa-pg-", dir=_scratchDirectory())
        self.data = os.path.join(self.directory, "data")
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"
        self.process: subprocess.Popen | None = None
        #: How the server's programs run: as C{postgres} under root.
        self.asUser: dict = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            self.asUser = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],
            }
        os.chmod(self.directory, 0o700)
        testCase.addCleanup(shutil.rmtree, self.directory, True)
        testCase.addCleanup(self.stop)
        # A copy of a cluster made once per test process, with its
        # database: initdb takes about a second and createdb a third, a
        # copy of their result a fraction of that.
        self._run("cp", "-a", self._template(), self.data)
        self.start()

    def _template(self) -> str:
        """
        The data directory of a fresh cluster (initdb) with the database
        L{DATABASE} in it instead of C{postgres}, made on first use in this
        process (by a server run on it once, on this server's port) and
        removed at its exit.  Its write-ahead log segments are of 1 MB,
        not 16: each copy is smaller by 11 MB.
        """
        global _TEMPLATE
        if _TEMPLATE is None:
            directory = tempfile.mkdtemp(
                prefix="msa-pg-template-", dir=_scratchDirectory()
            )
            atexit.register(shutil.rmtree, directory, True)
            if self.asUser:
                os.chown(directory, self.asUser["user"], self.asUser["group"])
            data = os.path.join(directory, "data")
            self._run(
                "initdb",
                "-D",
                data,
                "-U",
                USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--wal-segsize=1",
                "--no-sync",
                "--no-instructions",
            )
            self.start(data)
            try:
                server = ("-h", "127.0.0.1", "-p", str(self.port), "-U", USER)
                self._run("createdb", *server, DATABASE)
                # Nothing uses the default database: fewer files to copy.
                self._run("dropdb", *server, f"--maintenance-db={DATABASE}", "postgres")
            finally:
                self.stop()
            _TEMPLATE = data
        return _TEMPLATE

    def _run(self, program: str, *args: str) -> None:
        if not os.path.isabs(program) and program != "cp":
            program = os.path.join(self.bin, program)
        subprocess.run(
            [program, *args],
            check=True,
            **self.asUser,
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def start(self, data: str | None = None) -> None:
        """
        Start the server (on C{data}, by default its own data directory)
        and wait until it accepts connections.
        """
        log = open(os.path.join(self.directory, "server.log"), "ab")
        self.process = subprocess.Popen(
            [
                os.path.join(self.bin, "postgres"),
                "-D",
                data or self.data,
                "-p",
                str(self.port),
                "-k",
                self.directory,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=30",
            ],
            **self.asUser,
            cwd=self.directory,
            stdout=log,
            stderr=log,
        )
        log.close()
        waitUntilBlocking(
            self.ready, 30, f"PostgreSQL on port {self.port} to accept connections"
        )

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {self.serverLog()}")
        result = subprocess.run(
            [
                os.path.join(self.bin, "pg_isready"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            check=False,
        )
        return result.returncode == 0

    def serverLog(self) -> str:
        try:
            with open(os.path.join(self.directory, "server.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """
        Stop the server (fast shutdown: clients are disconnected at once).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
