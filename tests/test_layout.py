"""The layout holds: four packages with one role each, imports only downhill (no cycles, not
even through function-level imports), nothing climbing out of a package, and a non-editable
install that exports and serves from any working directory."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "medpclip_core": ROOT / "core",
    "medpclip_client": ROOT / "clients",
    "medpclip": ROOT / "export",
    "medpclip_tools": ROOT / "tools",
}
# what each package may import from the project (besides itself)
ALLOWED = {
    "medpclip_core": set(),
    "medpclip_client": {"medpclip_core"},
    "medpclip": {"medpclip_core"},
    "medpclip_tools": {"medpclip_core", "medpclip_client", "medpclip"},
}
# third-party imports a package must never make (at any level, lazily included)
FORBIDDEN = {
    "medpclip_core": {"torch", "tritonclient", "onnx", "safetensors"},
    "medpclip_client": {"torch", "onnx", "onnxruntime", "safetensors", "tokenizers"},
}
# the launcher runs in the serving image, which has neither torch nor the client
LAUNCHER = ("serve", "gateway", "supervisor", "triton_process", "deployment")


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, at any depth of its code (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            # `from pkg import mod` imports a module when pkg.mod is one of ours
            out.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES)
    return out


GRAPH = {
    name: {m for m in _imports(name, path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_packages_import_only_downhill():
    wrong = sorted(
        f"{name} imports {m}"
        for name, path in MODULES.items()
        for m in _imports(name, path)
        if _top(m) in PACKAGES and _top(m) != _top(name) and _top(m) not in ALLOWED[_top(name)]
    )
    assert not wrong, wrong


def test_no_import_cycles():
    """Depth-first search over every import, function-level ones included."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_light_packages_stay_light(package):
    heavy = sorted(
        f"{name} imports {m}"
        for name, path in MODULES.items()
        if _top(name) == package
        for m in _imports(name, path)
        if _top(m) in FORBIDDEN[package]
    )
    assert not heavy, heavy


def test_the_launcher_needs_neither_torch_nor_the_client():
    """Transitively: what the serving image's launcher imports from the project."""
    seen, todo = set(), [f"medpclip_tools.{m}" for m in LAUNCHER]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(GRAPH[name])
    third_party = {
        _top(m) for name in seen for m in _imports(name, MODULES[name]) if m not in MODULES
    }
    assert not {_top(n) for n in seen} & {"medpclip", "medpclip_client"}, sorted(seen)
    assert not third_party & {"torch", "onnx", "safetensors", "tokenizers"}, third_party


def test_nothing_climbs_out_of_its_package():
    climbing = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in MODULES.values()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "__file__" in line and ("parents[" in line or "parent.parent" in line)
    ]
    assert not climbing, climbing


@pytest.mark.timeout(600)
def test_a_non_editable_install_exports_from_any_directory(tmp_path):
    """Wheels of the four packages, installed into a fresh target folder (which shadows the
    checkout's editable installs): the export finds its default model and configs as package
    data and writes a complete repository from an unrelated working directory."""
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # build from copies: setuptools leaves build/ and *.egg-info beside the sources it builds
    sources = tmp_path / "src"
    junk = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for root in PACKAGES.values():
        shutil.copytree(root, sources / root.name, ignore=junk)
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
        + [str(sources / root.name) for root in PACKAGES.values()],
        check=True,
        cwd=tmp_path,
    )
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site)]
        + [str(w) for w in sorted(wheels.glob("*.whl"))],
        check=True,
    )
    script = """
import sys
from pathlib import Path
import medpclip, medpclip_core, medpclip_tools.serve
from medpclip import export
site = Path(sys.argv[1])
for m in (medpclip, medpclip_core, medpclip_tools.serve, export):
    assert Path(m.__file__).is_relative_to(site), m.__file__
assert export.DEFAULT_CHECKPOINT.is_relative_to(site), export.DEFAULT_CHECKPOINT
r = export.export(out=Path("build"), skip_parity=True, log=lambda line: None)
print(r.repository.resolve())
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(site)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    repository = Path(done.stdout.strip().splitlines()[-1])
    assert repository.is_relative_to(work)
    for model in ("preprocess", "image_encoder", "medp_clip"):
        assert (repository / model / "config.pbtxt").is_file()
    assert (repository / "image_encoder" / "1" / "model.onnx").is_file()
    assert (repository / "preprocess" / "1" / "tokenizer.json").is_file()
    help_text = subprocess.run(
        [sys.executable, "-m", "medpclip_tools.serve", "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--repository" in help_text
