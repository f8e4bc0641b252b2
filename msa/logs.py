"""
Log output for operators: C{twistd --logger msa.logs.jsonLogger} writes
every event as one JSON object per line on standard output (for journald or
a log shipper).  Every event of a session carries C{session}, and once
known C{queueId}; C{event} names what happened (connection, tls, auth,
accepted, refused, relay, disconnected).  No event ever carries a password,
a password hash or a SASL response.
"""

import sys

from twisted.logger import jsonFileLogObserver


def jsonLogger():
    """
    The observer factory for C{twistd --logger}.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
