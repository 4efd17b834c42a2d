"""``keyhole-init``: redirect a pod's (or a user's) outbound HTTPS and HTTP to the sidecar.

Run once, before the sidecar, in the network namespace to capture. With the real ``iptables``
tools it installs, in the nat table, a chain ``KEYHOLE_CAPTURE`` jumped to from ``OUTPUT``:
outbound TCP to the captured ports (443 and 80) is redirected to the sidecar's transparent
port — except the sidecar's own traffic (its UID), loopback, and the exempt CIDRs (the
cluster's Service and Pod ranges: in-cluster traffic is never captured). IPv6 is not
captured: IPv6 connections to those ports are reset (``ip6tables``), so clients fall back to
IPv4 at once instead of going around the sidecar. Idempotent: a second run rebuilds the chains
and adds each jump once. It prints what it installed.

Standalone (a laptop, a VM): ``sudo keyhole-init --uid-owner-exempt $(id -u keyhole)`` captures
every other user's traffic; ``--print`` shows the rules without installing them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from keyhole_common.cidr import parse_cidr

CHAIN = "KEYHOLE_CAPTURE"
DEFAULT_PORT = 15081
DEFAULT_UID = 65532
DEFAULT_PORTS = (443, 80)


@dataclass(frozen=True)
class Plan:
    exempt_uid: int
    to_port: int = DEFAULT_PORT
    ports: tuple[int, ...] = DEFAULT_PORTS
    exempt_cidrs: tuple[str, ...] = ()

    def ipv4(self) -> str:
        """An ``iptables-restore --noflush`` input: the chain, rebuilt (declaring a user chain
        in a --noflush restore empties it first)."""
        lines = ["*nat", f":{CHAIN} - [0:0]",
                 f"-A {CHAIN} -o lo -j RETURN",
                 f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
                 f"-A {CHAIN} -m owner --uid-owner {self.exempt_uid} -j RETURN"]
        lines += [f"-A {CHAIN} -d {cidr} -j RETURN" for cidr in self.exempt_cidrs
                  if ipaddress.ip_network(cidr).version == 4]
        lines.append(f"-A {CHAIN} -p tcp -m multiport --dports {_ports(self.ports)} "
                     f"-j REDIRECT --to-ports {self.to_port}")
        return "\n".join([*lines, "COMMIT", ""])

    def ipv6(self) -> str:
        lines = ["*filter", f":{CHAIN} - [0:0]",
                 f"-A {CHAIN} -o lo -j RETURN",
                 f"-A {CHAIN} -m owner --uid-owner {self.exempt_uid} -j RETURN"]
        lines += [f"-A {CHAIN} -d {cidr} -j RETURN" for cidr in self.exempt_cidrs
                  if ipaddress.ip_network(cidr).version == 6]
        lines.append(f"-A {CHAIN} -p tcp -m multiport --dports {_ports(self.ports)} "
                     "-j REJECT --reject-with tcp-reset")
        return "\n".join([*lines, "COMMIT", ""])


def _ports(ports: tuple[int, ...]) -> str:
    return ",".join(str(p) for p in ports)


def _port_list(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(",") if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ports such as 443,80") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: ports are 1-65535")
    return ports


def build_parser(prog: str = "keyhole-init", printing: bool = False) -> argparse.ArgumentParser:
    """``keyhole-init`` installs the rules; ``keyhole-sidecar transparent-rules`` (``printing``)
    prints them for a laptop or VM."""
    p = argparse.ArgumentParser(prog=prog, description=(
        "Print the iptables rules that redirect outbound HTTPS/HTTP of every user but the "
        "sidecar's to its --transparent-listen port (apply them as root)." if printing else
        "Redirect outbound HTTPS/HTTP of every user but the sidecar's to keyhole's "
        "transparent port, in this network namespace."))
    p.add_argument("--uid-owner-exempt", type=int, default=DEFAULT_UID, metavar="UID",
                   help=f"the sidecar's UID, whose traffic is never captured (default "
                        f"{DEFAULT_UID})")
    p.add_argument("--to-port", type=int, default=DEFAULT_PORT, metavar="PORT",
                   help=f"the sidecar's --transparent-listen port (default {DEFAULT_PORT})")
    p.add_argument("--capture-ports", type=_port_list, default=DEFAULT_PORTS, metavar="P,P",
                   help="destination ports to capture (default 443,80)")
    p.add_argument("--exempt-cidr", type=parse_cidr, action="append", default=[], metavar="CIDR",
                   help="destinations never captured, e.g. the Service and Pod CIDRs "
                        "(repeatable)")
    if not printing:
        p.add_argument("--print", action="store_true", dest="print_only",
                       help="print the iptables-restore input instead of installing it")
    return p


# Where the sidecar image keeps iptables (sidecar/Dockerfile); elsewhere, the system's own.
IMAGE_NETFILTER = Path("/netfilter")


def _tool_env() -> dict[str, str] | None:
    if not (IMAGE_NETFILTER / "bin").is_dir():
        return None
    return {**os.environ, "PATH": f"{IMAGE_NETFILTER / 'bin'}:{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": str(IMAGE_NETFILTER / "lib"),
            "XTABLES_LIBDIR": str(IMAGE_NETFILTER / "lib" / "xtables")}


def _which(tool: str) -> bool:
    env = _tool_env()
    return bool(shutil.which(tool, path=env["PATH"] if env else None))


def _run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = _tool_env()
    if env:
        command = [str(IMAGE_NETFILTER / "bin" / command[0]), *command[1:]]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, env=env)


def _install(family: str, restore: str, table: str, parent: str) -> str:
    tool = "iptables" if family == "ipv4" else "ip6tables"
    done = _run([f"{tool}-restore", "--noflush"], restore)
    if done.returncode != 0:
        raise RuntimeError(f"{tool}-restore refused the rules: {done.stderr.strip()}")
    rule = [parent, "-p", "tcp", "-j", CHAIN]
    if _run([tool, "-t", table, "-C", *rule]).returncode != 0:  # the jump, once
        added = _run([tool, "-t", table, "-A", *rule])
        if added.returncode != 0:
            raise RuntimeError(f"{tool} could not add the jump from {parent}: "
                               f"{added.stderr.strip()}")
    return _run([tool, "-t", table, "-S", CHAIN]).stdout + \
        _run([tool, "-t", table, "-S", parent]).stdout


def main(argv: list[str] | None = None, *, prog: str = "keyhole-init",
         printing: bool = False) -> int:
    args = build_parser(prog, printing).parse_args(argv)
    plan = Plan(exempt_uid=args.uid_owner_exempt, to_port=args.to_port,
                ports=args.capture_ports, exempt_cidrs=tuple(args.exempt_cidr))
    if printing or args.print_only:
        print("# iptables-restore --noflush <<EOF")
        print(plan.ipv4(), end="")
        print(f"EOF\niptables -t nat -C OUTPUT -p tcp -j {CHAIN} || "
              f"iptables -t nat -A OUTPUT -p tcp -j {CHAIN}")
        print("# ip6tables-restore --noflush <<EOF")
        print(plan.ipv6(), end="")
        print(f"EOF\nip6tables -C OUTPUT -p tcp -j {CHAIN} || ip6tables -A OUTPUT -p tcp -j {CHAIN}")
        return 0
    if not _which("iptables-restore"):
        print("keyhole-init: iptables-restore is not installed (Debian: apt-get install "
              "iptables)", file=sys.stderr)
        return 2
    try:
        installed = _install("ipv4", plan.ipv4(), "nat", "OUTPUT")
        print(f"keyhole-init: TCP to ports {_ports(plan.ports)} from every UID but "
              f"{plan.exempt_uid} goes to 127.0.0.1:{plan.to_port}:")
        print(installed, end="")
        if _which("ip6tables-restore") and _run(["ip6tables", "-S"]).returncode == 0:
            installed6 = _install("ipv6", plan.ipv6(), "filter", "OUTPUT")
            print(f"keyhole-init: IPv6 is not captured: IPv6 TCP to ports {_ports(plan.ports)} "
                  "is reset, so clients fall back to IPv4:")
            print(installed6, end="")
        else:
            print("keyhole-init: no IPv6 here (ip6tables unavailable); nothing to reset")
    except RuntimeError as exc:
        print(f"keyhole-init: {exc}; it needs NET_ADMIN and NET_RAW in this network namespace",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
