# -*- test-case-name: tests.test_passwordcheck -*-
"""
L{msa.accounts.passwords.PasswordVerifier}: the cache of recent successes never
lets a wrong or changed password through, and every wrong guess still pays
the full check.
"""

from twisted.trial import unittest

from msa.accounts.passwords import PasswordVerifier, hashPassword, verifyHash


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


class CountingVerify:
    def __init__(self):
        self.calls = 0

    def __call__(self, passwordHash, password):
        self.calls += 1
        return verifyHash(passwordHash, password)


class PasswordVerifierTests(unittest.TestCase):
    def setUp(self):
        self.verify = CountingVerify()
        self.clock = Clock()
        self.verifier = PasswordVerifier(self.verify, ttl=300, clock=self.clock)
        self.hash = hashPassword("right")

    def check(self, password, passwordHash=None, name="acme"):
        results = []
        self.verifier.check(name, passwordHash or self.hash, password).addCallback(
            results.append
        )
        return results[0]

    def test_successCached(self):
        self.assertTrue(self.check(b"right"))
        self.assertTrue(self.check(b"right"))
        self.assertEqual(self.verify.calls, 1)

    def test_wrongNeverCached(self):
        self.assertTrue(self.check(b"right"))
        for _ in range(3):
            self.assertFalse(self.check(b"wrong"))
        self.assertEqual(self.verify.calls, 4)

    def test_changedHash(self):
        self.assertTrue(self.check(b"right"))
        newHash = hashPassword("new")
        self.assertFalse(self.check(b"right", newHash))
        self.assertTrue(self.check(b"new", newHash))
        self.assertEqual(self.verify.calls, 3)

    def test_expiryEdge(self):
        self.assertTrue(self.check(b"right"))
        self.clock.now += 299
        self.assertTrue(self.check(b"right"))
        self.assertEqual(self.verify.calls, 1)
        self.clock.now += 1
        self.assertTrue(self.check(b"right"))
        self.assertEqual(self.verify.calls, 2)

    def test_otherAccountNotServed(self):
        self.assertTrue(self.check(b"right", name="acme"))
        self.assertTrue(self.check(b"right", name="other"))
        self.assertEqual(self.verify.calls, 2)

    def test_unknownAccountNeverCached(self):
        self.assertTrue(self.check(b"right", name=None))
        self.assertTrue(self.check(b"right", name=None))
        self.assertEqual(self.verify.calls, 2)

    def test_off(self):
        verifier = PasswordVerifier(self.verify, ttl=0, clock=self.clock)
        for _ in range(2):
            verifier.check("acme", self.hash, b"right")
        self.assertEqual(self.verify.calls, 2)

    def test_noPasswordKept(self):
        self.check(b"right")
        self.assertNotIn(b"right", repr(self.verifier._cache).encode())

    def test_concurrentChecksShareOneScrypt(self):
        from twisted.internet import defer

        gates = {b"right": defer.Deferred(), b"wrong": defer.Deferred()}
        calls = []

        def slowVerify(passwordHash, password):
            calls.append(password)
            return gates[password]

        verifier = PasswordVerifier(slowVerify, ttl=300, clock=self.clock)
        results = []
        for _ in range(5):
            verifier.check("acme", self.hash, b"right").addCallback(results.append)
        other = []
        verifier.check("acme", self.hash, b"wrong").addCallback(other.append)
        self.assertEqual(calls, [b"right", b"wrong"])
        gates[b"right"].callback(True)
        gates[b"wrong"].callback(False)
        self.assertEqual(results, [True] * 5)
        self.assertEqual(other, [False])
