"""keyhole-operator's command line refuses an operator channel it could not serve, before it
connects to anything, naming the flag and what to give."""

from __future__ import annotations

import subprocess
import sys

import pytest


def operator(*args: str) -> subprocess.CompletedProcess:
    """The real keyhole-operator command (it stops before connecting to anything)."""
    return subprocess.run([sys.executable, "-m", "keyhole_operator.cli", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "master.key"
    path.write_text("k" * 48)
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--channel-listen", "0.0.0.0:9445"], "give both --channel-listen and --channel-url"),
    (["--channel-url", "https://op:9445"], "give both --channel-listen and --channel-url"),
    (["--channel-listen", "0.0.0.0:9445", "--channel-url", "http://op:9445"],
     "the channel is HTTPS"),
    (["--channel-listen", "0.0.0.0:9445", "--channel-url", "https://op:9445",
      "--channel-ca", "/nonexistent/ca.crt"], "--channel-ca /nonexistent/ca.crt: cannot read it"),
])
def test_a_channel_it_could_not_serve_is_refused(key, args, message):
    done = operator("--master-key-file", key, "--standalone", *args)
    assert done.returncode == 2 and message in done.stderr


def test_a_lease_of_no_time_is_refused(key):
    done = operator("--master-key-file", key, "--channel-lease-seconds", "0")
    assert done.returncode == 2 and "give a number of seconds above 0" in done.stderr
