"""
A fast SMTP sink for the drain measurement (C{bench/run.py --drain}): the
test suite's downstream server (L{tests.downstream.DownstreamServer}, Twisted,
STARTTLS, messages kept in memory, no disk) on a given loopback port.

    python bench/sink.py --port PORT --dir CERTDIR

C{CERTDIR} holds (or gets) C{selfsigned-cert.pem} for localhost.  Prints
C{READY} when listening; on SIGTERM prints the number of messages received.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import reactor  # noqa: E402

from tests.downstream import DownstreamServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    server = DownstreamServer(args.dir)
    server.start(args.port)
    reactor.addSystemEventTrigger(
        "before",
        "shutdown",
        lambda: print(f"RECEIVED {len(server.messages)}", flush=True),
    )
    print("READY", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
