# -*- test-case-name: tests.test_checkers -*-
"""
Tests for L{msa.accounts.checkers}: L{AccountChecker} checks the credentials
of every SASL mechanism against an account store (one refusal for every
reason, scrypt for unknown users too), and L{SubmissionRealm} turns the
account name into its L{ISubmission} avatar.
"""

import base64
import hmac
import os

import attrs
import scramp
from puresasl.client import SASLClient
from scramp import ScramMechanism
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.credentials import UsernamePassword as TwistedUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import Interface, implementer

from msa.accounts.checkers import AccountChecker, SubmissionRealm
from msa.accounts.filestore import AccountFile
from msa.accounts.model import makeAccount, writeAccounts
from msa.accounts.passwords import DUMMY_HASH
from msa.interfaces import (
    IDigestMD5Credentials,
    IMechanismCredentials,
    IScramCredentials,
    ISubmission,
)
from msa.sasl.base import MechanismContext, UsernamePassword
from msa.sasl.digest_md5 import DigestMD5Mechanism
from msa.sasl.scram import ScramSHA256Mechanism
from tests.test_accounts import REALM, expectedHA1


@implementer(IDigestMD5Credentials, IMechanismCredentials)
class FakeDigestCredentials:
    """
    What a DIGEST-MD5 exchange by a client knowing C{password} yields.
    """

    def __init__(self, username, realm, password, mechanism="DIGEST-MD5"):
        self.username = username
        self.realm = realm
        self.mechanism = mechanism
        self._secret = expectedHA1(username, realm, password)

    def checkHA1(self, ha1):
        return hmac.compare_digest(ha1, self._secret)


@implementer(IScramCredentials, IMechanismCredentials)
class FakeScramCredentials:
    """
    What a SCRAM-SHA-256 exchange by a client knowing C{password} yields;
    the keys are derived independently with scramp.
    """

    def __init__(self, store, username, password, mechanism="SCRAM-SHA-256"):
        self.username = username
        self.mechanism = mechanism
        parameters = store.scramParameters(username, mechanism)
        salt, iterations = parameters if parameters else (b"salt" * 4, 4096)
        info = ScramMechanism("SCRAM-SHA-256").make_auth_info(
            password, iteration_count=iterations, salt=salt
        )
        self._keys = info[1], info[2]

    def checkKeys(self, storedKey, serverKey):
        return hmac.compare_digest(storedKey, self._keys[0]) and hmac.compare_digest(
            serverKey, self._keys[1]
        )


class DictStore:
    def __init__(self, *accounts):
        self.accounts = {a.name: a for a in accounts}

    def getAccount(self, name):
        return self.accounts.get(name)

    def scramParameters(self, username, mechanism):
        account = self.accounts.get(username)
        keys = account and account.scram.get(mechanism)
        return keys and (base64.b64decode(keys["salt"]), keys["iterations"])


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        self.plainOnly = makeAccount("plain", "pw-plain", [REALM], ["PLAIN"])
        self.disabled = attrs.evolve(
            makeAccount("off", "pw-off", [REALM]), enabled=False
        )
        self.store = DictStore(self.alice, self.plainOnly, self.disabled)
        self.checker = AccountChecker(self.store, threaded=False)

    def assertAccepted(self, credentials, name):
        self.assertEqual(
            self.successResultOf(self.checker.requestAvatarId(credentials)), name
        )

    def assertRefused(self, credentials):
        failure = self.failureResultOf(
            self.checker.requestAvatarId(credentials), UnauthorizedLogin
        )
        self.assertEqual(str(failure.value), "Authentication failed")

    def test_passwordMechanisms(self):
        for mechanism in ("PLAIN", "LOGIN"):
            self.assertAccepted(
                UsernamePassword("alice", "pw-alice", mechanism), "alice"
            )
            self.assertRefused(UsernamePassword("alice", "pw-alicE", mechanism))
        self.assertAccepted(UsernamePassword("plain", "pw-plain", "PLAIN"), "plain")

    def test_refusals(self):
        """
        Unknown users, disabled accounts and mechanisms the account may not
        use are refused just like a wrong password.
        """
        self.assertRefused(UsernamePassword("nobody", "pw-alice", "PLAIN"))
        self.assertRefused(UsernamePassword("off", "pw-off", "PLAIN"))
        self.assertRefused(UsernamePassword("plain", "pw-plain", "LOGIN"))
        self.assertRefused(FakeDigestCredentials("plain", REALM, "pw-plain"))
        self.assertRefused(FakeScramCredentials(self.store, "plain", "pw-plain"))
        self.assertRefused(FakeDigestCredentials("off", REALM, "pw-off"))
        self.assertRefused(FakeScramCredentials(self.store, "off", "pw-off"))

    def test_unknownUserCostsScrypt(self):
        """
        An unknown user's password is still run through scrypt.
        """
        import msa.accounts.passwords

        calls = []
        original = msa.accounts.passwords._scrypt
        self.patch(
            msa.accounts.passwords,
            "_scrypt",
            lambda *a: calls.append(a) or original(*a),
        )
        self.assertRefused(UsernamePassword("nobody", "pw", "PLAIN"))
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][2:5], (2**14, 8, 1))

    def test_digestMD5(self):
        self.assertAccepted(FakeDigestCredentials("alice", REALM, "pw-alice"), "alice")
        self.assertRefused(FakeDigestCredentials("alice", REALM, "wrong"))
        self.assertRefused(FakeDigestCredentials("alice", "other.realm", "pw-alice"))
        self.assertRefused(FakeDigestCredentials("nobody", REALM, "pw-alice"))

    def test_scram(self):
        self.assertAccepted(
            FakeScramCredentials(self.store, "alice", "pw-alice"), "alice"
        )
        self.assertRefused(FakeScramCredentials(self.store, "alice", "wrong"))
        self.assertRefused(FakeScramCredentials(self.store, "nobody", "pw-alice"))
        withoutKeys = attrs.evolve(self.alice, scram={})
        self.store.accounts["alice"] = withoutKeys
        self.assertRefused(FakeScramCredentials(self.store, "alice", "pw-alice"))

    def test_noMechanism(self):
        """
        Credentials that do not say which mechanism made them (Twisted's
        own, without L{IMechanismCredentials}) are refused.
        """
        self.assertRefused(TwistedUsernamePassword(b"alice", b"pw-alice"))

    def test_threaded(self):
        """
        By default scrypt runs in a thread; the results are the same.
        """
        checker = AccountChecker(self.store)
        d = checker.requestAvatarId(UsernamePassword("alice", "pw-alice", "PLAIN"))
        d.addCallback(self.assertEqual, "alice")
        d.addCallback(
            lambda _: checker.requestAvatarId(UsernamePassword("alice", "x", "PLAIN"))
        )
        return self.assertFailure(d, UnauthorizedLogin)


class RealMechanismTests(unittest.TestCase):
    """
    Whole exchanges with the real mechanisms and independent clients, checked
    by L{AccountChecker} against an L{AccountFile}.
    """

    def setUp(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "accounts.json")
        os.makedirs(os.path.dirname(path))
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        writeAccounts(path, {"alice": self.alice})
        self.store = AccountFile(path)
        self.checker = AccountChecker(self.store, threaded=False)
        self.context = MechanismContext(
            realm=REALM,
            serverNames=[REALM],
            scramParameters=self.store.scramParameters,
        )

    def scram(self, username, password):
        client = scramp.ScramClient(["SCRAM-SHA-256"], username, password)
        mechanism = ScramSHA256Mechanism(self.context)
        first = mechanism.start(client.get_client_first().encode()).data
        client.set_server_first(first.decode())
        result = mechanism.respond(client.get_client_final().encode())
        return self.checker.requestAvatarId(result.credentials)

    def digest(self, username, password):
        client = SASLClient(
            REALM, "smtp", mechanism="DIGEST-MD5", username=username, password=password
        )
        mechanism = DigestMD5Mechanism(self.context)
        response = client.process(mechanism.start(None).data)
        credentials = mechanism.respond(response).credentials
        return self.checker.requestAvatarId(credentials)

    def test_scram(self):
        self.assertEqual(self.successResultOf(self.scram("alice", "pw-alice")), "alice")
        self.failureResultOf(self.scram("alice", "pw-bob"), UnauthorizedLogin)
        self.failureResultOf(self.scram("bob", "pw-alice"), UnauthorizedLogin)

    def test_digestMD5(self):
        self.assertEqual(
            self.successResultOf(self.digest("alice", "pw-alice")), "alice"
        )
        self.failureResultOf(self.digest("alice", "pw-bob"), UnauthorizedLogin)
        self.failureResultOf(self.digest("bob", "pw-alice"), UnauthorizedLogin)

    def test_portal(self):
        """
        Through a L{Portal}: PLAIN logs in and yields the factory's avatar.
        """
        realm = SubmissionRealm(self.store, lambda account: FakeAvatar(account.name))
        portal = Portal(realm, [self.checker])
        credentials = UsernamePassword("alice", "pw-alice", "PLAIN")
        d = portal.login(credentials, None, ISubmission)
        interface, avatar, logout = self.successResultOf(d)
        self.assertEqual((interface, avatar), (ISubmission, FakeAvatar("alice")))
        bad = UsernamePassword("alice", "nope", "PLAIN")
        self.failureResultOf(portal.login(bad, None, ISubmission), UnauthorizedLogin)


@attrs.define
class FakeAvatar:
    """
    What the realm needs of an L{ISubmission} avatar: its C{logout}.
    """

    account: object
    loggedOut: bool = False

    def logout(self) -> None:
        self.loggedOut = True


class IOther(Interface):
    pass


class RealmTests(unittest.TestCase):
    def setUp(self):
        self.alice = makeAccount("alice", "pw", [], ["PLAIN"])
        self.made = []
        self.realm = SubmissionRealm(DictStore(self.alice), self.factory)

    def factory(self, account):
        avatar = FakeAvatar(account)
        self.made.append(avatar)
        return avatar

    def test_avatar(self):
        interface, avatar, logout = self.realm.requestAvatar("alice", None, ISubmission)
        self.assertIs(interface, ISubmission)
        self.assertEqual(self.made, [avatar])
        self.assertIs(avatar.account, self.alice)
        logout()

    def test_logout(self):
        """
        The avatar's own C{logout} (L{ISubmission.logout}) is called on
        logout.
        """
        calls = []

        def factory(account):
            return attrs.make_class("A", ["logout"])(lambda: calls.append(account.name))

        self.realm = SubmissionRealm(DictStore(self.alice), factory)
        self.realm.requestAvatar(b"alice", None, IOther, ISubmission)[2]()
        self.assertEqual(calls, ["alice"])

    def test_otherInterface(self):
        self.assertRaises(
            NotImplementedError, self.realm.requestAvatar, "alice", None, IOther
        )

    def test_goneAccount(self):
        self.assertRaises(
            UnauthorizedLogin, self.realm.requestAvatar, "bob", None, ISubmission
        )


class DeferredStore(DictStore):
    """
    A store that answers look-ups with a L{Deferred}, as a store backed by
    a database would.
    """

    def getAccount(self, name):
        return defer.succeed(super().getAccount(name))


@implementer(IMechanismCredentials)
class UnknownCredentials:
    """
    Credentials of no kind the checker knows, naming a mechanism the
    account may use.
    """

    username = "alice"
    password = "pw-alice"
    mechanism = "PLAIN"


class RecordingVerifier:
    """
    A L{msa.accounts.passwords.PasswordVerifier} stand-in recording what it
    is asked and answering C{answer}.
    """

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def check(self, name, passwordHash, password):
        self.calls.append((name, passwordHash, password))
        return defer.succeed(self.answer)


class CheckerMoreTests(unittest.TestCase):
    """
    The checker's behaviours without a test of their own before the tests
    followed the modules.
    """

    def setUp(self):
        self.alice = makeAccount("alice", "pw-alice", [REALM])
        self.store = DictStore(self.alice)

    def test_credentialInterfaces(self):
        """
        The checker takes the credentials of the password mechanisms,
        DIGEST-MD5 and SCRAM (EXTERNAL has its own checker).
        """
        self.assertEqual(
            AccountChecker.credentialInterfaces,
            (IUsernamePassword, IDigestMD5Credentials, IScramCredentials),
        )

    def test_verifierGiven(self):
        """
        The password is checked by the verifier given: with the account's
        name and hash and the UTF-8 password; for an unknown user, with no
        name and the dummy hash, and refused whatever it answers.
        """
        verifier = RecordingVerifier(True)
        checker = AccountChecker(self.store, verifier=verifier)
        d = checker.requestAvatarId(UsernamePassword("alice", "pw-älice", "PLAIN"))
        self.assertEqual(self.successResultOf(d), "alice")
        d = checker.requestAvatarId(UsernamePassword("nobody", "pw", "PLAIN"))
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(
            verifier.calls,
            [
                ("alice", self.alice.passwordHash, "pw-älice".encode()),
                (None, DUMMY_HASH, b"pw"),
            ],
        )

    def test_verifierAnswerMustBeTrue(self):
        """
        Only C{True} from the verifier logs in, not any true value.
        """
        checker = AccountChecker(self.store, verifier=RecordingVerifier(1))
        d = checker.requestAvatarId(UsernamePassword("alice", "pw-alice", "PLAIN"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_bytesUsername(self):
        """
        A user name given as bytes is read as UTF-8.
        """
        checker = AccountChecker(self.store, threaded=False)
        d = checker.requestAvatarId(UsernamePassword(b"alice", "pw-alice", "PLAIN"))
        self.assertEqual(self.successResultOf(d), "alice")

    def test_deferredStore(self):
        """
        A store answering with a L{Deferred} works as one answering at once.
        """
        checker = AccountChecker(DeferredStore(self.alice), threaded=False)
        d = checker.requestAvatarId(UsernamePassword("alice", "pw-alice", "PLAIN"))
        self.assertEqual(self.successResultOf(d), "alice")
        d = checker.requestAvatarId(UsernamePassword("alice", "wrong", "PLAIN"))
        self.failureResultOf(d, UnauthorizedLogin)

    def test_unknownCredentials(self):
        """
        Credentials of a kind the checker does not know are refused with
        the same text as a wrong password, as are credentials without a
        user name.
        """
        checker = AccountChecker(self.store, threaded=False)
        for credentials in (UnknownCredentials(), object()):
            failure = self.failureResultOf(
                checker.requestAvatarId(credentials), UnauthorizedLogin
            )
            self.assertEqual(str(failure.value), "Authentication failed")


class RealmMoreTests(unittest.TestCase):
    """
    The realm's behaviours without a test of their own before the tests
    followed the modules.
    """

    def setUp(self):
        self.alice = makeAccount("alice", "pw", [], ["PLAIN"])

    def test_anonymous(self):
        """
        There is no anonymous submission: the anonymous avatar id is
        refused.
        """
        realm = SubmissionRealm(DictStore(self.alice), lambda account: account)
        self.assertRaises(UnauthorizedLogin, realm.requestAvatar, (), None, ISubmission)

    def test_disabledSinceCheck(self):
        """
        An account disabled between the checker and the realm gets no
        avatar.
        """
        disabled = attrs.evolve(self.alice, enabled=False)
        made = []
        realm = SubmissionRealm(DictStore(disabled), made.append)
        self.assertRaises(
            UnauthorizedLogin, realm.requestAvatar, "alice", None, ISubmission
        )
        self.assertEqual(made, [])

    def test_deferredStore(self):
        """
        With a store answering with a L{Deferred}, the avatar comes in one;
        a missing account fails it.
        """
        realm = SubmissionRealm(DeferredStore(self.alice), FakeAvatar)
        interface, avatar, logout = self.successResultOf(
            realm.requestAvatar("alice", None, ISubmission)
        )
        self.assertEqual((interface, avatar), (ISubmission, FakeAvatar(self.alice)))
        self.failureResultOf(
            realm.requestAvatar("bob", None, ISubmission), UnauthorizedLogin
        )
