"""The package's shape: one home per concern, no import circles, a repository that stands
alone, and meanings that C and Python share said once (root-free)."""

from __future__ import annotations

import ast
import re
import subprocess

import pytest
from support import ROOT

from qtrace_bpf.contract import abi, maps

# folder -> the import name it ships as (pyproject's package-dir)
PACKAGES = {"qtrace_bpf": "qtrace_bpf", "exporters": "qtrace_bpf.exporters"}
BPF_C = (ROOT / "probes" / "qtrace.bpf.c").read_text()

# The layers, lowest first: a module may import its own subpackage and the layers listed
# for it, nothing else of the package.  "base" is errors, log, logfmt and procfs at the top.
BASE = {"qtrace_bpf.errors", "qtrace_bpf.log", "qtrace_bpf.logfmt", "qtrace_bpf.procfs"}
MAY_IMPORT = {
    "contract": {"base"},
    "bpf": {"base"},
    "symbols": {"base", "contract"},
    "program": {"base", "contract", "bpf", "symbols"},
    "vms": {"base", "contract", "symbols", "program"},
    "exporters": {"base", "contract", "init"},
    "commands": {"base", "contract", "bpf", "symbols", "program", "vms", "exporters", "init"},
}


def python_files() -> dict[str, object]:
    """Every module of the shipped package: import name -> path (subpackages included)."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = [package, *rel]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def modules() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path))
            for name, path in python_files().items()}


def layer(name: str) -> str:
    """The layer a module belongs to: its subpackage, "base", "init", or "top" (cli)."""
    if name in BASE:
        return "base"
    if name == "qtrace_bpf":
        return "init"
    parts = name.split(".")
    if parts[1] in MAY_IMPORT:
        return parts[1]
    return "top"


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, at top level or inside a function."""
    package = name if name in PACKAGES.values() else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_circle_inside_the_package():
    """Deferred imports count too: a lazy import is still a circle a reader must untangle."""
    trees = modules()
    graph = {n: imports(n, t, set(trees)) for n, t in trees.items()}
    assert "qtrace_bpf.symbols.elfsym" in graph["qtrace_bpf.symbols.binaries"], \
        "the graph sees imports"
    circles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], done)
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_low_level_modules_import_nothing_above_them():
    """ELF reading and the bpf() syscall know nothing of qtrace but its error types."""
    trees = modules()
    for name in ("qtrace_bpf.symbols.elf", "qtrace_bpf.bpf.bpfsys",
                 "qtrace_bpf.symbols.first_insn"):
        assert imports(name, trees[name], set(trees)) <= {"qtrace_bpf.errors"}, name


def test_each_layer_imports_only_the_layers_below_it():
    """The folders are the architecture: bpf knows nothing of QEMU, symbols nothing of BPF,
    the engine nothing of the exporters; only the commands (and cli) see everything."""
    trees = modules()
    assert len(trees) > 50, "subpackages are walked"
    wrong = []
    for name, tree in trees.items():
        mine = layer(name)
        if mine in ("top", "init"):
            continue
        allowed = MAY_IMPORT.get(mine, set())
        for dep in imports(name, tree, set(trees)):
            theirs = layer(dep)
            if theirs != mine and theirs not in allowed:
                wrong.append(f"{name} ({mine}) imports {dep} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_folder_holds_too_many_modules():
    """A folder a newcomer can take in at a glance (~12 modules)."""
    counts: dict[str, int] = {}
    for path in python_files().values():
        if path.name != "__init__.py":
            counts[str(path.parent.relative_to(ROOT))] = counts.get(
                str(path.parent.relative_to(ROOT)), 0) + 1
    assert max(counts.values()) <= 12, counts
    for folder in counts:
        if folder != "qtrace_bpf" and folder != "exporters":
            init = ROOT / folder / "__init__.py"
            assert ast.get_docstring(ast.parse(init.read_text())), f"{folder}: what it owns"


def test_no_tracked_file_cites_the_brief_outside_the_repository():
    """A clone has no ../shared: docs live in docs/."""
    files = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "ls-files"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    cited = [f for f in files if f != "tests/unit/test_layout.py" and (ROOT / f).is_file() and
             re.search(r"\bshared/(facts|ARCHITECTURE|STYLE)",
                       (ROOT / f).read_text(errors="replace"))]
    assert not cited
    for doc in ("architecture.md", "qemu-kvm.md", "bpf-pinning.md"):
        assert (ROOT / "docs" / doc).is_file(), doc


@pytest.mark.parametrize("spec", maps.COUNTERS, ids=lambda s: s.name)
def test_a_counter_map_is_named_in_its_spec_and_the_c_source_only(spec):
    quoted = f'"{spec.name}"'
    places = [str(p.relative_to(ROOT)) for p in python_files().values()
              if quoted in p.read_text()]
    assert places == ["qtrace_bpf/contract/maps.py"], places
    assert re.search(rf"\bQT_HASH\([^;]*\b{spec.name}\b", BPF_C), "defined in qtrace.bpf.c"


def test_every_map_python_names_exists_in_the_c_source():
    names = [v for k, v in vars(maps).items() if k.isupper() and isinstance(v, str) and
             k != "VM_WIDE"]
    assert len(names) >= 8
    for name in names:
        assert re.search(rf"\b{name}\b", BPF_C), name


def test_the_c_source_has_one_handler_set_per_catalog_slot():
    uses = re.findall(r"\bSLOT\((\d+)\)", BPF_C.split("#define SLOT(n)")[1])
    assert sorted(int(n) for n in uses) == list(range(abi.MAX_SLOTS))


def test_the_return_branch_handles_exactly_the_return_actions():
    """on_probe()'s `if (is_return)` block names the actions whose bit is in RETURN_ACTIONS."""
    block = re.search(r"if \(is_return\) \{(.*?)\n    \}", BPF_C, re.S)
    assert block, "on_probe's return branch"
    handled = {abi.ACTIONS[a.lower()] for a in re.findall(r"action == ACT_(\w+)", block[1])}
    wanted = {v for v in abi.ACTIONS.values() if abi.RETURN_ACTIONS & (1 << v)}
    assert handled == wanted and len(wanted) >= 4


def test_modules_keep_to_one_concern_and_say_it():
    """Each opens with a docstring saying what it owns; none grows past ~300 lines."""
    for path in python_files().values():
        if path.name in ("__init__.py", "kvm_ioctl_numbers.py", "_revision.py"):
            continue
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{where}: no opening docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= 320, f"{where}: {lines} lines"
