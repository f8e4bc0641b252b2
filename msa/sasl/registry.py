# -*- test-case-name: tests.test_sasl -*-
"""
The mechanisms this package implements, by their SASL names: what the
submission server offers from (L{msa.submission.server}) when a listener's
C{mechanisms} list names them.
"""

from collections.abc import Callable

from msa.sasl.base import MechanismContext
from msa.sasl.digest_md5 import DigestMD5Mechanism
from msa.sasl.external import ExternalMechanism
from msa.sasl.login import LoginMechanism
from msa.sasl.plain import PlainMechanism
from msa.sasl.scram import ScramSHA256Mechanism, ScramSHA256PlusMechanism


def mechanismFactories() -> dict[str, Callable[[MechanismContext], object]]:
    """
    Every mechanism this package implements, by its SASL name.

    @return: a new L{dict} of upper-case SASL name to a callable that makes
        the mechanism's state machine for one exchange from a
        L{MechanismContext}; the caller may change it.
    """
    return {
        "PLAIN": PlainMechanism,
        "LOGIN": LoginMechanism,
        "EXTERNAL": ExternalMechanism,
        "DIGEST-MD5": DigestMD5Mechanism,
        "SCRAM-SHA-256": ScramSHA256Mechanism,
        "SCRAM-SHA-256-PLUS": ScramSHA256PlusMechanism,
    }
