"""The package's shape (docs/design.md): no module imports another's private name, the modules
import each other without a cycle, and the kernels and the exported model's code never import
mtbi_fast. Read from the source with ``ast``, imports inside functions included."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def modules() -> dict[str, Path]:
    out = {}
    for base, folder in ((ROOT, "mtbi_fast"), (ROOT / "kernels", "mtbi_kernels")):
        for f in sorted((base / folder).rglob("*.py")):
            name = ".".join(f.relative_to(base).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every import in a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                if f"{target}.{a.name}" in known:  # a submodule
                    out.append((f"{target}.{a.name}", "", node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def test_no_module_imports_a_private_name_of_another():
    known = modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: {target}.{what}"
           for name, path in known.items() for target, what, line in imports(name, path, known)
           if target in known and target != name and what.startswith("_") and not what.startswith("__")]
    assert bad == []


def test_the_modules_import_each_other_without_a_cycle():
    known = modules()
    graph = {name: {t for t, _, _ in imports(name, path, known) if t in known and t != name}
             for name, path in known.items()}
    # a module and its package __init__ are one unit here (a package imports its modules)
    done, cycles = set(), []

    def visit(node, trail):
        if node in trail:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own module
                continue
            visit(nxt, trail + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_the_kernels_and_the_exported_code_never_import_mtbi_fast():
    known = modules()
    for name, path in known.items():
        if name.startswith("mtbi_kernels") or name.startswith("mtbi_fast.hf_code"):
            for target, _, line in imports(name, path, known):
                if name.startswith("mtbi_fast.hf_code") and target.startswith("mtbi_fast.hf_code"):
                    continue
                assert not target.startswith("mtbi_fast"), f"{path.relative_to(ROOT)}:{line} imports {target}"


def test_the_repository_root_shadows_no_installed_package():
    """`python -m ...` from the root puts the root first on sys.path: a regular package there named
    like an installed one (``kernels``: transformers >= 5.25 imports the PyPI package) would win."""
    probe = ("import importlib.util, sys\n"
             "for name in sys.argv[1:]:\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    print(name, spec.origin if spec and spec.origin else '-')")
    tops = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = subprocess.run([sys.executable, "-c", probe, *tops], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    allowed = {"mtbi_fast"}  # the package itself, installed editable from here
    shadowing = [line for line in out if line and line.split()[0] not in allowed
                 and line.split()[1].startswith(str(ROOT))]
    assert shadowing == []
    assert (ROOT / "kernels" / "mtbi_kernels" / "__init__.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()
