# -*- test-case-name: tests.test_lmtp -*-
"""
Who may connect to an LMTP listener over TCP: the core MTA only, named by
its networks (C{[lmtp] allow_from}).  The listener is never for the
companies: a unix socket is judged by its file permissions, TCP by this
list and, on a TLS listener, by the client certificate.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["AddressAllowlist"]


class AddressAllowlist:
    """
    A list of networks (C{192.0.2.0/24}, C{2001:db8::/32}, or single
    addresses).
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def allows(self, host: str) -> bool:
        """
        Whether the address C{host} is in one of the networks (an IPv4
        address mapped into IPv6 counts as IPv4).
        """
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)
