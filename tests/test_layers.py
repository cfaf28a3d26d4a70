"""The packages depend one way: models -> sampling -> {tasks, distill, pool} -> strategies -> evolution
-> compile. No module imports from a package above its own (at module level or inside a function), so
there are no import cycles between packages; `agora_jax.errors`, `agora_jax.atomic` and
`agora_jax.records` sit below all."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "agora_jax"
LAYERS = {"errors": 0, "atomic": 0, "records": 0, "models": 1, "sampling": 2, "tasks": 2, "distill": 3, "pool": 3,
          "strategies": 4, "evolution": 5, "compile": 6}


def imported_packages(path: pathlib.Path) -> set[str]:
    """The agora_jax packages (first component below agora_jax) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module] if node.module != "agora_jax" else [f"agora_jax.{a.name}" for a in node.names]
        else:
            continue
        found |= {m.split(".")[1] for m in modules if m.startswith("agora_jax.")}
    return found


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages == set(LAYERS)


def test_no_module_imports_from_a_package_above_its_own():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue  # agora_jax/__init__.py
        own = relative.parts[0] if len(relative.parts) > 1 else relative.stem  # errors.py, atomic.py, records.py
        for target in imported_packages(path):
            if target != own and LAYERS[target] >= LAYERS[own]:
                upward.append(f"{relative} imports agora_jax.{target}")
    assert not upward, upward


def test_the_checker_sees_upward_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from agora_jax.evolution.config import base_config\n"
                      "from agora_jax import sampling\nimport agora_jax.models.shapes\n")
    assert imported_packages(module) == {"evolution", "sampling", "models"}



def test_every_module_imports_first_in_a_fresh_interpreter():
    """No import cycle: each module imported before any other agora_jax module (one interpreter; the
    agora_jax modules are dropped from sys.modules between imports, third-party ones stay loaded)."""
    import subprocess
    import sys

    modules = sorted(".".join(("agora_jax", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py"))
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'agora_jax' or m.startswith('agora_jax.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
