# -*- test-case-name: tests.test_accounts,tests.test_durable -*-
"""
The accounts that may submit mail and the file they live in.  The
twisted.cred checker and realm built on it are in L{msa.accounts.checkers}.

The file is one JSON document, indented and with sorted keys so that an
operator can read and diff it::

    {
      "accounts": {
        "alice": {
          "digestHA1": {"mail.example.org": "<32 hex digits>"},
          "enabled": true,
          "mechanisms": ["DIGEST-MD5", "LOGIN", "PLAIN", "SCRAM-SHA-256"],
          "passwordHash": "scrypt$16384$8$1$<base64 salt>$<base64 hash>",
          "scram": {"SCRAM-SHA-256": {"iterations": 4096, "salt": "<base64>",
                                      "serverKey": "<base64>",
                                      "storedKey": "<base64>"}}
        }
      },
      "version": 1
    }

An account whose name or password is not ASCII keeps a list of up to three
H(A1) per realm instead of one (L{msa.sasl.digest_md5.ha1Variants}: the
clients convert to ISO 8859-1 differently).

No password is ever stored, but two of these secrets are I{password
equivalent} for their mechanism: whoever reads C{digestHA1} can log in with
DIGEST-MD5 for that realm, and whoever reads C{storedKey} and C{serverKey}
can impersonate the server to SCRAM clients.  The file must therefore be
readable by its owner only (mode 0600); L{msa.accounts.filestore.AccountFile}
refuses it otherwise.

The authorization fields of an account (senders, limits, client
certificates; see L{msa.policy.authorization}) and its mailbox of return
messages (L{msa.accounts.mailboxes}) are kept in L{Account.extra} and
validated when the file is read.
"""

import binascii
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from msa.accounts.mailboxes import MailboxSettings
from msa.accounts.passwords import b64, hashPassword, parseScrypt, unb64, verifyHash
from msa.durable import writeDurably
from msa.policy.authorization import AccountRules
from msa.sasl.digest_md5 import ha1Variants
from msa.sasl.scram import deriveKeys

FILE_VERSION = 1
DEFAULT_MECHANISMS = frozenset({"PLAIN", "LOGIN", "DIGEST-MD5", "SCRAM-SHA-256"})
#: The mechanisms L{makeAccount} knows how to store secrets for.
#: EXTERNAL (a client certificate, R13) is allowed per account, never by
#: default.
KNOWN_MECHANISMS = DEFAULT_MECHANISMS | {"EXTERNAL"}
#: SCRAM iteration count of new secrets (the minimum of RFC 7677).
SCRAM_ITERATIONS = 4096
_KNOWN_KEYS = frozenset({"enabled", "mechanisms", "passwordHash", "digestHA1", "scram"})
_SCRAM_KEYS = frozenset({"salt", "iterations", "storedKey", "serverKey"})
_MECHANISM_NAME = re.compile(r"[A-Z0-9_-]{1,20}")
_HEX_HA1 = re.compile(r"[0-9a-fA-F]{32}")
FAILURE_TEXT = "Authentication failed"


class AccountsFileError(Exception):
    """
    The accounts file cannot be used; the message names the file, and the
    account and key at fault when there is one.
    """


def _mechanisms(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.strip().upper() for name in names)


def _isHA1(value: object) -> bool:
    return isinstance(value, str) and _HEX_HA1.fullmatch(value) is not None


def _digestSecrets(
    values: Mapping[str, str | Iterable[str]],
) -> dict[str, tuple[str, ...]]:
    """
    Realm -> one hex H(A1) (as files written before variants hold it) or
    several, as a L{tuple} of lower-case hex values.
    """
    return {
        realm: tuple(h.lower() for h in ((value,) if isinstance(value, str) else value))
        for realm, value in values.items()
    }


@attrs.frozen
class Account:
    """
    One account.

    @ivar name: the account (and SASL authentication) name.
    @ivar enabled: whether it may log in at all.
    @ivar mechanisms: upper-case SASL mechanism names it may use.
    @ivar passwordHash: C{scrypt$n$r$p$<b64 salt>$<b64 hash>}, for PLAIN and
        LOGIN.
    @ivar digestHA1: realm -> the hex H(A1) values (MD5(name:realm:password),
        L{msa.sasl.digest_md5.ha1Variants}) real clients compute, present only
        when DIGEST-MD5 is allowed: one for an ASCII name and password, up to
        three otherwise.  In the file a single value is a string (the format
        of files written before there were variants), several a list.  Each
        is a B{password equivalent} for DIGEST-MD5 in that realm.
    @ivar scram: SCRAM mechanism -> C{{"salt": b64, "iterations": int,
        "storedKey": b64, "serverKey": b64}}.
    @ivar extra: every other key of the account in the file, kept unchanged.
    """

    name: str
    enabled: bool = True
    mechanisms: frozenset[str] = attrs.field(
        default=DEFAULT_MECHANISMS, converter=_mechanisms
    )
    passwordHash: str = ""
    digestHA1: dict[str, tuple[str, ...]] = attrs.field(
        factory=dict, converter=_digestSecrets
    )
    scram: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    extra: dict[str, Any] = attrs.field(factory=dict)

    def withPassword(self, password: str, realms: Iterable[str]) -> "Account":
        """
        @return: this account with every secret derived from C{password}: the
            scrypt hash, H(A1) for each of C{realms} if DIGEST-MD5 is
            allowed, and the keys of each allowed SCRAM mechanism.
        @raise ValueError: for an empty password, or one SASLprep refuses
            when SCRAM is allowed.
        """
        if not password:
            raise ValueError("the password must not be empty")
        digestHA1 = {}
        if "DIGEST-MD5" in self.mechanisms:
            for realm in realms:
                digestHA1[realm] = tuple(
                    ha1.hex() for ha1 in ha1Variants(self.name, realm, password)
                )
        scram = {}
        if "SCRAM-SHA-256" in self.mechanisms:
            salt = secrets.token_bytes(16)
            storedKey, serverKey = deriveKeys(password, salt, SCRAM_ITERATIONS)
            scram["SCRAM-SHA-256"] = {
                "salt": b64(salt),
                "iterations": SCRAM_ITERATIONS,
                "storedKey": b64(storedKey),
                "serverKey": b64(serverKey),
            }
        return attrs.evolve(
            self,
            passwordHash=hashPassword(password),
            digestHA1=digestHA1,
            scram=scram,
        )

    def withMechanisms(self, mechanisms: Iterable[str]) -> "Account":
        """
        @return: this account allowed C{mechanisms}, without the secrets of
            mechanisms no longer allowed.  Newly allowed DIGEST-MD5 or SCRAM
            need L{withPassword} before they can be used.
        """
        allowed = _mechanisms(mechanisms)
        digestHA1 = self.digestHA1 if "DIGEST-MD5" in allowed else {}
        scram = {m: k for m, k in self.scram.items() if m in allowed}
        return attrs.evolve(self, mechanisms=allowed, digestHA1=digestHA1, scram=scram)


def makeAccount(
    name: str,
    password: str,
    realms: Iterable[str],
    mechanisms: Iterable[str] = DEFAULT_MECHANISMS,
) -> Account:
    """
    A new enabled account with every secret derived from C{password}.

    @param realms: the DIGEST-MD5 realms to store H(A1) for.
    @raise ValueError: for an unusable name, an empty password or an unknown
        mechanism.
    """
    if (
        not name
        or name != name.strip()
        or any(ord(c) < 32 or c == "\x7f" for c in name)
    ):
        raise ValueError(f"unusable account name {name!r}")
    allowed = _mechanisms(mechanisms)
    if not allowed:
        raise ValueError("an account needs at least one mechanism")
    unknown = allowed - KNOWN_MECHANISMS
    if unknown:
        raise ValueError("unknown mechanism(s): " + ", ".join(sorted(unknown)))
    return Account(name=name, mechanisms=allowed).withPassword(password, realms)


def verifyPassword(account: Account, password: str) -> bool:
    """
    @return: whether C{password} matches the scrypt hash of C{account}, in
        time independent of where they differ.
    """
    return verifyHash(account.passwordHash, password.encode("utf-8"))


def _accountToJSON(account: Account) -> dict[str, Any]:
    clash = _KNOWN_KEYS & set(account.extra)
    if clash:
        raise ValueError(f"account {account.name!r}: extra repeats {sorted(clash)}")
    document = dict(account.extra)
    document.update(
        enabled=account.enabled,
        mechanisms=sorted(account.mechanisms),
        passwordHash=account.passwordHash,
    )
    if account.digestHA1:
        document["digestHA1"] = {
            realm: hexes[0] if len(hexes) == 1 else list(hexes)
            for realm, hexes in account.digestHA1.items()
        }
    if account.scram:
        document["scram"] = {m: dict(k) for m, k in account.scram.items()}
    return document


def _accountFromJSON(where: str, name: str, document: object) -> Account:
    def fail(why: str) -> AccountsFileError:
        return AccountsFileError(f"{where}: account {name!r}: {why}")

    if not isinstance(document, dict):
        raise fail("must be a JSON object")
    for key in ("enabled", "mechanisms", "passwordHash"):
        if key not in document:
            raise fail(f"missing key {key!r}")
    enabled = document["enabled"]
    if not isinstance(enabled, bool):
        raise fail("key 'enabled' must be true or false")
    mechanisms = document["mechanisms"]
    if not isinstance(mechanisms, list) or not all(
        isinstance(m, str) and _MECHANISM_NAME.fullmatch(m) for m in mechanisms
    ):
        raise fail("key 'mechanisms' must be a list of upper-case SASL names")
    passwordHash = document["passwordHash"]
    try:
        parseScrypt(passwordHash if isinstance(passwordHash, str) else "")
    except ValueError as e:
        raise fail(f"key 'passwordHash': {e}")
    digestHA1 = document.get("digestHA1", {})
    if not isinstance(digestHA1, dict) or not all(
        _isHA1(v)
        or (
            isinstance(v, list)
            and 0 < len(v) <= 3
            and len(set(v)) == len(v)
            and all(_isHA1(h) for h in v)
        )
        for v in digestHA1.values()
    ):
        raise fail(
            "key 'digestHA1' must map realms to 32 hex digits "
            "(or a list of up to three different such values)"
        )
    scram = document.get("scram", {})
    if not isinstance(scram, dict):
        raise fail("key 'scram' must be a JSON object")
    for mechanism, keys in scram.items():
        at = f"key 'scram' / {mechanism!r}"
        if not isinstance(keys, dict) or set(keys) != _SCRAM_KEYS:
            raise fail(f"{at} needs exactly {sorted(_SCRAM_KEYS)}")
        iterations = keys["iterations"]
        if type(iterations) is not int or iterations < 1:
            raise fail(f"{at}: 'iterations' must be a positive integer")
        for field in ("salt", "storedKey", "serverKey"):
            try:
                if not unb64(keys[field]):
                    raise ValueError()
            except (ValueError, AttributeError, binascii.Error):
                raise fail(f"{at}: {field!r} must be non-empty base64")
    extra = {k: v for k, v in document.items() if k not in _KNOWN_KEYS}
    try:
        AccountRules.fromExtra(extra)
        MailboxSettings.fromExtra(extra)
    except ValueError as e:
        raise fail(str(e))
    return Account(
        name=name,
        enabled=enabled,
        mechanisms=mechanisms,
        passwordHash=passwordHash,
        digestHA1=digestHA1,
        scram=scram,
        extra=extra,
    )


def parseAccounts(data: bytes, where: str = "<accounts>") -> dict[str, Account]:
    """
    Parse the contents of an accounts file.

    @param where: the file name to use in error messages.
    @raise AccountsFileError: naming C{where} and the account at fault.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AccountsFileError(f"{where}: not UTF-8: {e}")
    except ValueError as e:
        raise AccountsFileError(f"{where}: not valid JSON: {e}")
    if not isinstance(document, dict):
        raise AccountsFileError(f"{where}: must hold a JSON object")
    if document.get("version") != FILE_VERSION:
        raise AccountsFileError(
            f"{where}: unsupported 'version' {document.get('version')!r} "
            f"(this program reads version {FILE_VERSION})"
        )
    accounts = document.get("accounts")
    if not isinstance(accounts, dict):
        raise AccountsFileError(f"{where}: key 'accounts' must be a JSON object")
    return {name: _accountFromJSON(where, name, a) for name, a in accounts.items()}


def readAccounts(path: str | os.PathLike[str]) -> dict[str, Account]:
    """
    @return: the accounts in the file at C{path}, by name.
    @raise AccountsFileError: when it cannot be read or is malformed.
    """
    return readChecked(os.fspath(path), checkMode=False)[0]


def readChecked(path: str, checkMode: bool) -> tuple[dict[str, Account], tuple]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if checkMode and stat.S_IMODE(st.st_mode) & 0o077:
                raise AccountsFileError(
                    f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or "
                    f"others at password-equivalent secrets; "
                    f"fix it with: chmod 600 {path}"
                )
            data = f.read()
    except OSError as e:
        raise AccountsFileError(f"{path}: cannot read: {e.strerror or e}")
    return parseAccounts(data, path), fileStamp(st)


def fileStamp(st: os.stat_result) -> tuple:
    return (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_mode,
    )


def writeAccounts(
    path: str | os.PathLike[str], accounts: Mapping[str, Account]
) -> None:
    """
    Replace the file at C{path} atomically with C{accounts} (keyed by
    L{Account.name}): write a mode 0600 temporary file in the same
    directory, fsync it, rename it over C{path} and fsync the directory
    (L{msa.durable.writeDurably}).
    """
    document = {
        "version": FILE_VERSION,
        "accounts": {a.name: _accountToJSON(a) for a in accounts.values()},
    }
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    writeDurably(path, data, mode=0o600)


#: One account's JSON object as the file holds it, and back (validated,
#: raising L{AccountsFileError}): the same serialisation for every store,
#: so that moving accounts between them is lossless.
accountToJSON = _accountToJSON
accountFromJSON = _accountFromJSON
