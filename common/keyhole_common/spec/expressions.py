"""CEL expressions (``spec.mcp``'s conditions), through the Rust engine of the maintained
``common-expression-language`` package.

Its extension module is loaded on its own: the package's ``__init__`` also imports its
interactive command-line tool (typer, rich, prompt_toolkit, pygments — some 25 MB that the
images do without and the sidecar would load at every start). That relies on where the
package keeps the module (``cel/cel.<suffix>``), so pyproject.toml bounds the version. Loaded
on first use: a sidecar with no condition never loads it.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def _engine() -> ModuleType:
    package = importlib.util.find_spec("cel")  # found, not imported
    if package is None or not package.submodule_search_locations:
        raise ImportError("common-expression-language is not installed: spec.mcp's "
                          "conditions need it (pip install keyhole installs it)")
    folder = Path(package.submodule_search_locations[0])
    path = next((folder / f"cel{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (folder / f"cel{suffix}").is_file()), None)
    if path is None:
        raise ImportError(f"no CEL engine in {folder}: a common-expression-language release "
                          "keyhole does not know; install the version pyproject.toml names")
    loader = importlib.machinery.ExtensionFileLoader("cel.cel", str(path))
    spec = importlib.util.spec_from_file_location("cel.cel", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=512)
def compile_expression(expression: str) -> Any:
    """The compiled program (``.execute(variables)``); ValueError with the line and column
    (``<input>:1:22``) when the expression does not compile."""
    return _engine().compile(expression)
