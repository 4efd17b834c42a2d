"""CIDRs on a command line: the sidecar's keyhole-init and the operator both take them."""

from __future__ import annotations

import argparse
import ipaddress


def parse_cidr(text: str) -> str:
    """A CIDR (or one address) in canonical form; ArgumentTypeError names the mistake."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR such as 10.96.0.0/12") from None
