"""docs/architecture.md draws the packages as file trees; they must list exactly the modules
the code has (a new module undocumented, or a documented one gone, fails here). The one
rule about imports that import-linter cannot state: aiohttp's internals stay in the wire. And
the shape the stage pipeline keeps (issue 31): forward.py only orders the stages and relays,
and nothing the sidecar runs takes more than 8 parameters (a ninth is an object waiting to be
named)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
NAME = re.compile(r"[\w.\-]+(/|\.py|\.ya?ml)")


def trees() -> dict[str, tuple[set[str], set[str]]]:
    """Each tree's root folder → (the Python files it lists, other files it names)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), flags=re.S)
    for block in blocks:
        lines = block.splitlines()
        root = lines[0].split()[0] if lines and lines[0].split() else ""
        if not root.endswith("/"):
            continue
        modules, others = found.setdefault(root, (set(), set()))
        parents = {2: root}
        for line in lines[1:]:
            token = line.split()[0] if line.strip() else ""
            indent = len(line) - len(line.lstrip())
            if not NAME.fullmatch(token):
                continue  # a description carried onto the next line
            if indent == 0:
                others.add(token)  # a file beside the tree (the CRD)
                continue
            path = parents[indent] + token
            if token.endswith("/"):
                parents[indent + 2] = path
            elif token.endswith(".py"):
                modules.add(path)
    return found


def test_the_architecture_doc_draws_every_package():
    assert set(trees()) == {"common/keyhole_common/", "sidecar/keyhole_sidecar/",
                            "operator/keyhole_operator/", "plugin/keyhole_kubectl/"}


@pytest.mark.parametrize("root", sorted(trees()))
def test_each_tree_lists_exactly_the_modules_of_its_package(root):
    listed, others = trees()[root]
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / root).rglob("*.py")
              if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts}
    assert not actual - listed, f"in the code, not in docs/architecture.md: {sorted(actual - listed)}"
    assert not listed - actual, f"in docs/architecture.md, not in the code: {sorted(listed - actual)}"
    for other in others:
        assert (ROOT / other).exists(), other


# aiohttp's documented modules; every other one is its internals (the relay relies on some:
# tests/unit/test_aiohttp_internals.py names them, and pyproject.toml bounds the version).
AIOHTTP_PUBLIC = {"aiohttp", "aiohttp.web", "aiohttp.abc", "aiohttp.resolver"}
WIRE = ROOT / "sidecar" / "keyhole_sidecar" / "proxy" / "wire"


def _aiohttp_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if node.module == "aiohttp"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "aiohttp" or n.startswith("aiohttp.")}
    return found


def test_only_the_wire_touches_aiohttp_internals():
    offenders = {}
    for path in [*(ROOT / "sidecar").rglob("*.py"), *(ROOT / "operator").rglob("*.py"),
                 *(ROOT / "common").rglob("*.py")]:
        if WIRE in path.parents:
            continue
        private = {m for m in _aiohttp_imports(path) if m not in AIOHTTP_PUBLIC
                   and not (m.startswith("aiohttp.") and m.count(".") == 1
                            and m.split(".")[1][:1].isupper())}  # aiohttp.ClientSession & co
        if private:
            offenders[str(path.relative_to(ROOT))] = sorted(private)
    assert not offenders, f"aiohttp internals outside proxy/wire: {offenders}"


FORWARD = ROOT / "sidecar" / "keyhole_sidecar" / "proxy" / "forward.py"
MAX_PARAMETERS = 8


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = function.args
    named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    return len([a for a in named if a.arg not in ("self", "cls")])


def _wide_functions(path: Path) -> list[str]:
    return [f"{path.name}:{node.lineno} {node.name}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _parameters(node) > MAX_PARAMETERS]


def test_forward_keeps_only_the_order_of_the_stages_and_the_relay():
    lines = len(FORWARD.read_text().splitlines())
    assert lines < 250, f"forward.py has {lines} lines: what was added belongs in a stage"


def test_no_function_of_the_sidecar_takes_more_than_eight_parameters(tmp_path):
    wide = [f for path in (ROOT / "sidecar").rglob("*.py") for f in _wide_functions(path)]
    assert not wide, f"more than {MAX_PARAMETERS} parameters: {wide}"
    sample = tmp_path / "x.py"  # and the check sees one
    sample.write_text("def f(self, a, b, c, d, e, f, g, h, *, i): ...\n")
    assert _wide_functions(sample) == ["x.py:1 f"]


def test_the_internals_check_sees_an_internal_import(tmp_path):
    """The check above is not vacuous: it finds what it is looking for."""
    sample = tmp_path / "x.py"
    sample.write_text("from aiohttp.http_parser import HttpRequestParser\nfrom aiohttp import web\n")
    assert _aiohttp_imports(sample) == {"aiohttp.http_parser", "aiohttp", "aiohttp.web"}


def test_one_intercepted_request_walks_through_each_policy_module_once(tmp_path, upstream,
                                                                      marker):
    """Where a request leaves for the upstream and where its answer leaves for the client,
    the policy modules on the stack are the doors' decision (handlers), then the exchange
    (forward): no module entered twice on one walk (tests/support/walk_probe.py notes them)."""
    import json
    import time

    from tests.integration.clients import curl
    from tests.support.config import INJECTIONS, SECRETS, resolve_all
    from tests.support.sidecar import start_sidecar

    sidecar = start_sidecar(tmp_path, INJECTIONS, SECRETS, resolve=resolve_all(upstream.port),
                            upstream_ca=upstream.ca_file, module="tests.support.walk_probe")
    try:
        assert curl(sidecar, f"https://api.routed.test/reflect?m={marker}").status == 200
        (tmp_path / "walk.ask").touch()
        deadline = time.monotonic() + 10
        while not (tmp_path / "walk.json").exists():
            assert time.monotonic() < deadline, "the probe did not answer"
            time.sleep(0.05)
        walks = json.loads((tmp_path / "walk.json").read_text())
    finally:
        sidecar.stop()
    policy = [[m for i, m in enumerate(walk) if m.startswith("keyhole_sidecar.proxy.")
               and ".wire" not in m and (i == 0 or walk[i - 1] != m)] for walk in walks]
    assert len(policy) >= 2  # the request out, the answer back
    assert all(walk == ["keyhole_sidecar.proxy.handlers", "keyhole_sidecar.proxy.forward"]
               for walk in policy), policy
