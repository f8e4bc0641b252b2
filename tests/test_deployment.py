# -*- test-case-name: tests.test_deployment -*-
"""
Deployment: the tests run after a non-editable install as README.rst says;
and on hardened hosts: the systemd units in etc/ are valid
(C{systemd-analyze verify}), and the MSA really runs socket-activated: a
socket it did not open itself (C{systemd-socket-activate}, the same
LISTEN_FDS hand-over as systemd's socket unit) serves STARTTLS (index 0)
and implicit TLS (index 1) through C{systemd:} endpoint strings.
"""

import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import sysconfig
import time

import attrs
from twisted.internet import defer, threads
from twisted.trial import unittest

from msa.accounts.model import makeAccount, writeAccounts
from msa.tls import ensureSelfSignedCertificate
from tests.e2e import (
    MESSAGE,
    auditLockFree,
    freePort,
    requireProgram,
    writeConfig,
)
from tests.test_e2e import submit
from tests.waiting import waitUntil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class SystemdUnitTests(unittest.TestCase):
    def test_verify(self):
        analyze = requireProgram(self, "systemd-analyze")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name in ("digipoort-msa.service", "digipoort-msa.socket"):
            with open(os.path.join(ROOT, "etc", name)) as f:
                text = f.read()
            # verify checks that ExecStart exists: point it at this venv.
            text = text.replace("/opt/digipoort-msa/.venv/bin/twistd", TWISTD)
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        result = subprocess.run(
            [
                analyze,
                "verify",
                "--man=no",
                os.path.join(directory, "digipoort-msa.socket"),
                os.path.join(directory, "digipoort-msa.service"),
            ],
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.strip(), "", result.stderr)

    def test_verifyInstanceTemplate(self):
        """
        The template unit of README.rst's "More than one core on one host"
        verifies as an instance, and each instance has its own
        configuration, state directory and spool.
        """
        analyze = requireProgram(self, "systemd-analyze")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(ROOT, "etc", "digipoort-msa@.service")) as f:
            text = f.read()
        for line in (
            "--config /etc/digipoort-msa/msa-%i.toml",
            "StateDirectory=digipoort-msa/%i",
            "ReadWritePaths=/var/spool/digipoort-msa/%i",
            "User=digipoort-msa",
            "NoNewPrivileges=true",
        ):
            self.assertIn(line, text)
        self.assertNotIn(".socket", text.split("[Service]")[1])
        text = text.replace("/opt/digipoort-msa/.venv/bin/twistd", TWISTD)
        with open(os.path.join(directory, "digipoort-msa@.service"), "w") as f:
            f.write(text)
        result = subprocess.run(
            [analyze, "verify", "--man=no", "digipoort-msa@1.service"],
            capture_output=True,
            text=True,
            cwd=directory,
            env=dict(os.environ, SYSTEMD_UNIT_PATH=directory + ":"),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.strip(), "", result.stderr)

    def test_haproxyExample(self):
        """
        The example HAProxy configuration is valid for Debian's HAProxy and
        sends the PROXY header to every instance, for submission and POP3
        (two instances each).
        """
        haproxy = requireProgram(self, "haproxy")
        path = os.path.join(ROOT, "etc", "haproxy-digipoort-msa.cfg")
        result = subprocess.run(
            [haproxy, "-c", "-f", path], capture_output=True, text=True
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(path) as f:
            servers = [s.split() for s in f if s.strip().startswith("server ")]
        self.assertEqual(len(servers), 8)
        for server in servers:
            self.assertIn("send-proxy-v2", server)

    def test_serviceRunsUnprivilegedWithSocketActivation(self):
        with open(os.path.join(ROOT, "etc", "digipoort-msa.service")) as f:
            service = f.read()
        self.assertIn("User=digipoort-msa", service)
        self.assertIn("Requires=digipoort-msa.socket", service)
        self.assertIn("NoNewPrivileges=true", service)
        with open(os.path.join(ROOT, "etc", "digipoort-msa.socket")) as f:
            socketUnit = f.read()
        self.assertLess(
            socketUnit.index("ListenStream=587"), socketUnit.index("ListenStream=465")
        )


class PackagingTests(unittest.TestCase):
    def test_everyPackageInstalled(self):
        """
        Every package under msa/ is listed in setup.cfg's C{packages}: the
        README's first command (C{pip install .}, not editable) installs
        only those, and a package left out breaks the installed daemon
        while the tests, run from the checkout, still pass.
        """
        import configparser

        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(parser["options"]["packages"].split())
        found = {
            os.path.relpath(directory, ROOT).replace(os.sep, ".")
            for directory, _, files in os.walk(os.path.join(ROOT, "msa"))
            if "__init__.py" in files
        }
        self.assertEqual(found - listed, set())
        self.assertIn("twisted.plugins", listed)


class NonEditableTrialTests(unittest.TestCase):
    """
    After the README's C{pip install .} (not editable), the tests run from
    the checkout as README.rst says: C{python -m twisted.trial tests.X}.
    The C{trial} script cannot find them (its C{sys.path} starts with the
    venv's C{bin/}, not the current directory, and only C{msa} was
    installed), which README.rst says too.
    """

    def nonEditableVenv(self) -> str:
        """
        A scratch venv with the project installed from a copy of the
        checkout (C{pip install --no-deps}, not editable); its dependencies
        come from this venv's site-packages, whose editable C{.pth} (the
        checkout on C{sys.path}) it does not process.

        @return: the venv's directory.
        """
        scratch = os.path.abspath(self.mktemp())
        source = os.path.join(scratch, "source")
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        # What setup.cfg installs: the packages and the manual pages.
        for name in ("msa", "twisted", "man"):
            shutil.copytree(
                os.path.join(ROOT, name), os.path.join(source, name), ignore=ignore
            )
        for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.rst"):
            shutil.copy(os.path.join(ROOT, name), source)
        venv = os.path.join(scratch, "venv")
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", venv], check=True
        )
        site = sysconfig.get_paths(vars={"base": venv, "platbase": venv})["purelib"]
        with open(os.path.join(site, "dependencies.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
            + ["--disable-pip-version-check"]
            + ["--target", site, source],
            check=True,
            capture_output=True,
        )
        with open(os.path.join(os.path.dirname(sys.executable), "trial")) as f:
            script = f.read().split("\n", 1)[1]
        trial = os.path.join(venv, "bin", "trial")
        with open(trial, "w") as f:
            f.write(f"#!{venv}/bin/python\n{script}")
        os.chmod(trial, 0o755)
        return venv

    def test_pythonMinusM(self):
        """
        In a non-editable install, C{python -m twisted.trial tests.X} run
        in the checkout passes and the C{trial} script finds no C{tests},
        as README.rst says.
        """
        venv = self.nonEditableVenv()
        python = os.path.join(venv, "bin", "python")
        check = [python, "-c", "import msa, sys; print(msa.__file__)"]
        where = subprocess.run(check, cwd="/", capture_output=True, text=True)
        self.assertTrue(where.stdout.startswith(venv), where.stdout + where.stderr)
        test = "tests.test_readme.LayoutTests"
        byModule = subprocess.run(
            [python, "-m", "twisted.trial", test],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        self.assertEqual(byModule.returncode, 0, byModule.stdout + byModule.stderr)
        self.assertIn("PASSED (successes=2)", byModule.stdout)
        byScript = subprocess.run(
            [os.path.join(venv, "bin", "trial"), test],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        self.assertIn(f"{test!r} does not name an object", byScript.stdout)
        with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
            readme = f.read()
        self.assertIn("\n    .venv/bin/python -m twisted.trial tests.", readme)
        self.assertIn("``.venv/bin/trial tests.test_sasl_plain`` answers", readme)


def auditSettled(audit: str, relayed: int) -> bool:
    """
    Whether the audit log C{audit} has C{relayed} relay records and no
    process holds its lock.
    """
    with open(audit, encoding="utf-8") as f:
        events = [json.loads(line)["event"] for line in f if line.strip()]
    return events.count("relayed") >= relayed and auditLockFree(audit)


class SocketActivationTests(unittest.TestCase):
    def activated(self, sections: dict | None = None):
        """
        C{twistd digipoort-msa} under C{systemd-socket-activate}, on two
        sockets it did not open (STARTTLS on C{systemd:...index=0},
        implicit TLS on C{index=1}), writing to its outbox.

        @return: the process, its STARTTLS and implicit TLS ports, its
            certificate, and a function listing the outbox's messages.
        """
        activate = requireProgram(self, "systemd-socket-activate")
        directory = os.path.abspath(self.mktemp())
        state = os.path.join(directory, "state")
        os.makedirs(state, mode=0o700)
        certFile, _ = ensureSelfSignedCertificate(state, "localhost")
        accounts = os.path.join(directory, "accounts.json")
        writeAccounts(
            accounts,
            {
                "alice": attrs.evolve(
                    makeAccount("alice", "wonderland", ["localhost"]),
                    extra={"senders": ["@mijnbedrijf.nl"]},
                )
            },
        )
        config = os.path.join(directory, "msa.toml")
        server = {
            "hostname": "localhost",
            "state_dir": state,
            "starttls_listeners": ["systemd:domain=INET:index=0"],
            "implicit_tls_listeners": ["systemd:domain=INET:index=1"],
        }
        sections = dict(sections or {})
        server.update(sections.pop("server", {}))
        writeConfig(
            config, {"server": server, "accounts": {"file": accounts}, **sections}
        )
        starttls, implicit = freePort(), freePort()
        log = open(os.path.join(directory, "twistd.log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                activate,
                # systemd (227 and later) always names the descriptors, and
                # Twisted insists on the names.
                "--fdname=submission:submissions",
                "-l",
                f"127.0.0.1:{starttls}",
                "-l",
                f"127.0.0.1:{implicit}",
                TWISTD,
                "-n",
                "--pidfile=",
                "digipoort-msa",
                "--config",
                config,
            ],
            env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
                process.wait(15)

        self.addCleanup(stop)
        outbox = os.path.join(state, "outbox")

        def messages() -> list[str]:
            # The outbox writes each file under a temporary name
            # (.NAME.RANDOM.tmp) first: only the .eml files are messages.
            if not os.path.isdir(outbox):
                return []
            return sorted(n for n in os.listdir(outbox) if n.endswith(".eml"))

        return process, starttls, implicit, certFile, messages

    def submitBoth(self, starttls: int, implicit: int, certFile: str):
        """
        A submission on each socket, in a thread, retried until twistd is
        up: a L{Deferred} of both replies.
        """

        def run():
            import ssl

            context = ssl.create_default_context(cafile=certFile)
            # The sockets exist before twistd does; the first connection
            # starts it (as with Accept=no), so allow it time to come up.
            deadline = time.time() + 30
            while True:
                try:
                    return (
                        submit(starttls, context),
                        submit(implicit, context, implicit=True),
                    )
                except (TimeoutError, smtplib.SMTPServerDisconnected, ConnectionError):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.2)

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_systemdEndpoints(self):
        _, starttls, implicit, certFile, messages = self.activated()
        first, second = yield self.submitBoth(starttls, implicit, certFile)
        self.assertEqual((first[0], second[0]), (250, 250))
        yield waitUntil(lambda: len(messages()) == 2, what="2 messages in the outbox")
        names = messages()
        self.assertEqual(len(names), 2)
        outbox = os.path.dirname(certFile) + "/outbox"
        for name in names:
            with open(os.path.join(outbox, name), "rb") as f:
                self.assertTrue(f.read().endswith(MESSAGE))

    @defer.inlineCallbacks
    def test_systemdEndpointsWithWorkers(self):
        """
        With C{[server] workers = 2}: worker 1 gets systemd's sockets from
        worker 0, and serves both while worker 0 is stopped.
        """
        from tests.redisserver import RedisServer
        from tests.test_workers import children

        redis = RedisServer(self)
        process, starttls, implicit, certFile, messages = self.activated(
            {
                "server": {"workers": 2},
                "limits": {"backend": "redis", "url": redis.url},
            }
        )
        first, second = yield self.submitBoth(starttls, implicit, certFile)
        self.assertEqual((first[0], second[0]), (250, 250))
        yield waitUntil(lambda: len(children(process.pid)) == 1, what="worker 1")
        [worker] = children(process.pid)
        # Forked from worker 0 (so /proc/PID/environ still shows the
        # environment worker 0 was started with: the one the worker runs
        # with, without LISTEN_*, is tested in tests.test_forked and
        # test_workerEnvironment).
        with open(f"/proc/{worker}/comm") as f:
            self.assertEqual(f.read().strip(), "msa-worker-1")
        state = os.path.dirname(certFile)
        control = os.path.join(state, "workers", "1", "control.sock")
        yield waitUntil(lambda: os.path.exists(control), what="worker 1 running")
        # Stopped while it holds the shared audit log's lock (appending its
        # relay record), worker 0 would hold up every worker's commits: so
        # it is stopped once both messages are relayed and the lock is free.
        audit = os.path.join(state, "audit", "audit.jsonl")
        yield waitUntil(
            lambda: auditSettled(audit, relayed=2), what="worker 0's records written"
        )
        process.send_signal(signal.SIGSTOP)
        try:
            first, second = yield self.submitBoth(starttls, implicit, certFile)
        finally:
            process.send_signal(signal.SIGCONT)
        self.assertEqual((first[0], second[0]), (250, 250))
        yield waitUntil(lambda: len(messages()) == 4, what="4 messages in the outbox")
