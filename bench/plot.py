"""Draw the benchmark's headline figures as a PNG for docs/performance.md.

    .venv/bin/python -m bench.plot [results.json] [--out docs/performance.png]

Two panels from the medians of a run: requests per second over 16 keep-alive connections
(figure a, each bar labelled with its ratio to direct) and p50 latency of one sequential
connection (figure b). Needs matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.run import RESULTS

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("direct", "keyhole", "squid", "mitmproxy", "keyhole-base-url", "nginx-reverse",
         "aiohttp-floor")
KEYHOLE_COLOUR, PEER_COLOUR, DIRECT_COLOUR = "#1f6feb", "#8b949e", "#2da44e"


def _colour(peer: str) -> str:
    if peer == "direct":
        return DIRECT_COLOUR
    return KEYHOLE_COLOUR if peer.startswith("keyhole") else PEER_COLOUR


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    median = results["median"]
    peers = [p for p in ORDER if p in median and "a_rps_keepalive" in median[p]]
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    colours = [_colour(p) for p in peers]

    values = [median[p]["a_rps_keepalive"] for p in peers]
    bars = rate.bar(peers, values, color=colours)
    for bar, peer in zip(bars, peers, strict=True):
        ratio = median[peer].get("a_rps_keepalive_x_direct")
        if ratio is not None:
            rate.annotate(f"{ratio:.2f}\N{MULTIPLICATION SIGN}",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=9)
    rate.set_title("(a) requests/s, 16 keep-alive connections, 1 KiB")
    rate.set_ylabel("requests per second (median of rounds)")

    with_latency = [p for p in peers if "b_p50_ms" in median[p]]
    values = [median[p]["b_p50_ms"] for p in with_latency]
    bars = latency.bar(with_latency, values, color=[_colour(p) for p in with_latency])
    for bar, value in zip(bars, values, strict=True):
        latency.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=9)
    latency.set_title("(b) p50 latency, one connection, sequential")
    latency.set_ylabel("milliseconds (median of rounds)")

    for axis in (rate, latency):
        axis.tick_params(axis="x", labelrotation=30)
        axis.spines[["top", "right"]].set_visible(False)
    machine = results["machine"]
    fig.suptitle(f"keyhole and its peers on 127.0.0.1 — {machine['cpus']} CPUs, Python "
                 f"{machine['python']}, {len(results['rounds'])} rounds, {results['when']}",
                 fontsize=10)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.png")
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
