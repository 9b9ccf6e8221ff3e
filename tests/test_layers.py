"""The layering of docs/architecture.md, checked from the source: every ``import`` of a
steelworks module, at the top of a file or inside a function, must go down the layers.

    platform                      the driver: pipeline, CLI, cluster and job commands
      serve        evals          HTTP serving; benchmark scoring
        inference                 the engines (built-in, vLLM) and sampling
          train                   model, parallelism, the train loop
            data   kernels        corpora to shards; fused Triton kernels
              core                config, atomic writes, run directories, storage, faults

A package may import the packages listed for it below and itself. serve imports evals in
one module only, its eval route; nothing imports platform.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "steelworks"

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "kernels": {"core"},
    "data": {"core"},
    "train": {"core", "kernels", "data"},
    "inference": {"core", "kernels", "data", "train"},
    "evals": {"core", "kernels", "data", "train", "inference"},
    "serve": {"core", "data", "train", "inference", "evals"},
    "platform": {"core", "kernels", "data", "train", "inference", "evals", "serve"},
}
# The one module of serve that may import evals: the /v1/evals route.
SERVE_EVALS_ROUTE = "serve/routes/evals.py"


def steelworks_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a steelworks module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("steelworks")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("steelworks"):
            if node.module == "steelworks":  # from steelworks import x: x may be a package
                found += [(node.lineno, f"steelworks.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "relative import"))
    return found


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        layer = rel.split("/")[0] if "/" in rel else None  # None: steelworks/__init__, __main__
        for line, module in steelworks_imports(path):
            where = f"steelworks/{rel}:{line} imports {module}"
            if module == "relative import":
                bad.append(f"{where} (write the absolute steelworks.<package> path)")
                continue
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else None
            if target is None or target == "__version__" or target == layer:
                continue
            if target == "platform" and rel != "__main__.py":
                bad.append(f"{where}: nothing imports platform, the driver")
            elif layer == "serve" and target == "evals" and rel != SERVE_EVALS_ROUTE:
                bad.append(f"{where}: only {SERVE_EVALS_ROUTE} may import evals")
            elif layer is not None and target not in ALLOWED[layer] | {"platform"}:
                bad.append(f"{where}: {layer} may import only {sorted(ALLOWED[layer])}")
    return bad


def test_every_package_is_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "a new package needs its place in ALLOWED and docs/architecture.md"


def test_imports_run_down_the_layers():
    bad = violations(PACKAGE)
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


@pytest.mark.parametrize(("rel", "source", "complaint"), [
    ("data/x.py", "from steelworks.train.loop import train", "data may import only ['core']"),
    ("core/x.py", "def f():\n    import steelworks.data.shards\n", "core may import only []"),
    ("train/x.py", "from steelworks.platform import pipeline", "nothing imports platform"),
    ("serve/app.py", "from steelworks.evals.runner import x", "only serve/routes/evals.py"),
    ("evals/x.py", "from steelworks.serve.app import build_app", "evals may import only"),
    ("evals/x.py", "from .runner import x", "absolute"),
])
def test_the_check_catches_an_upward_import(tmp_path, rel, source, complaint):
    """The checker itself: each kind of forbidden import is reported, with file and line."""
    f = tmp_path / rel
    f.parent.mkdir(parents=True)
    f.write_text(source)
    bad = violations(tmp_path)
    assert len(bad) == 1 and complaint in bad[0] and f"steelworks/{rel}:" in bad[0], bad


MAX_FUNCTION_LINES = 100


def test_no_function_over_100_lines():
    """docs/architecture.md, principle 1: a function a reader can hold in their head."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_stage_configs_do_not_import_torch():
    """Validating a config (every CLI call) must not pay for importing torch (seconds):
    train/config.py once imported the kernels' patch module, and so torch."""
    import subprocess
    import sys

    code = ("import sys; import steelworks.platform.settings; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _modules() -> dict[str, list[str]]:
    """package -> its module names (subpackages' modules as ``routes/openai``), no __init__."""
    out: dict[str, list[str]] = {}
    for pkg in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        out[pkg.name] = sorted(f.relative_to(pkg).with_suffix("").as_posix()
                               for f in pkg.rglob("*.py") if f.name != "__init__.py")
    return out


@pytest.mark.parametrize(("doc", "section"), [("README.md", "## Layout"),
                                              ("docs/architecture.md", "## What each package owns")])
def test_layout_docs_name_every_module(doc, section):
    """README's layout section and docs/architecture.md describe the tree as it is: each
    package has an entry (``  core/ ...`` in README's block, ``- **core/**:`` in the
    architecture page) that names every module in it, and no entry is for a package that
    does not exist."""
    import re

    text = (PACKAGE.parent / doc).read_text(encoding="utf-8")
    text = text[text.index(section):]
    text = text[:text.find("\n## ", 5) if "\n## " in text[5:] else len(text)]
    starts = list(re.finditer(r"^(?:- \*\*|  )(\w+)/", text, flags=re.MULTILINE))
    entries = {m.group(1): text[m.start():(starts[i + 1].start() if i + 1 < len(starts) else len(text))]
               for i, m in enumerate(starts)}
    modules = _modules()
    assert set(entries) == set(modules), f"{doc}: entries {sorted(entries)}, packages {sorted(modules)}"
    missing = [f"{pkg}/{m}" for pkg, ms in modules.items() for m in ms
               if not re.search(rf"\b{re.escape(m.split('/')[-1])}\b", entries[pkg])]
    assert not missing, f"{doc} does not name: {missing}"
