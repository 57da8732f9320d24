"""The package's layering, read from the source: the library never imports the command line.

``commands/`` only parses arguments and prints; everything it drives lives in the library, so a
change to a command cannot break ``downstream/``, ``analysis/`` or a user's script (issue 16).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "smartformer"
#: Modules allowed to import the command line: the commands themselves and the entry points.
CLI = ("commands/", "cli.py", "__main__.py")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module that ``source`` (a module of ``package``) imports, at the top or inside a function,
    as absolute names: ``from a.b import c`` gives ``a.b`` and ``a.b.c``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against the package, one level up per extra dot
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    package = ".".join(("smartformer", *path.relative_to(PACKAGE).parent.parts))
    return imported_modules(path.read_text(encoding="utf-8"), package)


def command_line_imports(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "smartformer.commands" or m.startswith("smartformer.commands."))


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.relative_to(PACKAGE).as_posix().startswith(CLI))


@pytest.mark.parametrize(
    "source",
    [
        "from smartformer.commands.attention import x",
        "import smartformer.commands.probe",
        "def f():\n    from smartformer.commands import localize\n",
        "from ..commands import export",
        "from ..commands.features import y",
    ],
)
def test_every_way_of_importing_the_command_line_is_seen(source: str) -> None:
    assert command_line_imports(imported_modules(source, "smartformer.downstream"))


def test_the_library_is_read() -> None:
    assert len(library_modules()) > 40
    assert "smartformer.commands._options" in imports_of(PACKAGE / "commands" / "attention.py")


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_modules_do_not_import_the_command_line(path: Path) -> None:
    wrong = command_line_imports(imports_of(path))
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}: move what it needs out of commands/"


@pytest.mark.parametrize("folder", ["benchmarks", "tools"])
def test_benchmarks_and_tools_do_not_import_the_command_line(folder: str) -> None:
    """They drive commands as a user does (``python -m smartformer ...``) or call the library."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        wrong = command_line_imports(imported_modules(path.read_text(encoding="utf-8"), ""))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def readme_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    """The README's library table: each row's first module, and for each further ``.z`` the two
    modules it can mean (a sibling ``smartformer.x.z`` of ``smartformer.x.y``, or, when the first
    name is a package, its submodule ``smartformer.x.y.z``)."""
    rows = []
    for row in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if row.startswith("| `smartformer."):
            base, *rest = re.findall(r"`([^`]+)`", row.split("|")[1])
            rows.append((base, [(base.rsplit(".", 1)[0] + t, base + t) for t in rest if t.startswith(".")]))
    return rows


def library_modules() -> set[str]:
    modules = set()
    for path in (ROOT / "src" / "smartformer").rglob("*.py"):
        parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_the_readme_module_table_matches_the_tree() -> None:
    """Every name of the table exists, and every library module is in it (itself or its package)."""
    modules = library_modules()
    listed = set()
    for base, alternatives in readme_rows():
        assert base in modules, f"the README's library table names {base}, which does not exist"
        listed.add(base)
        for sibling, submodule in alternatives:
            assert sibling in modules or submodule in modules, f"README: neither {sibling} nor {submodule} exists"
            listed.update({sibling, submodule} & modules)
    packages = {m for m in modules if (ROOT / "src" / Path(*m.split("."))).is_dir()}
    library = {
        m
        for m in modules - packages
        if ".commands" not in m
        and m not in ("smartformer.cli", "smartformer.__main__")
        and not m.rsplit(".", 1)[-1].startswith("_")
    }
    missing = sorted(
        m for m in library if not any(".".join(m.split(".")[:i]) in listed for i in range(2, len(m.split(".")) + 1))
    )
    assert not missing, f"modules missing from the README's library table: {missing}"


def test_help_does_not_import_torch() -> None:
    """``smartformer --help`` lists the commands without importing torch (seconds of start-up)."""
    probe = (
        "import sys\n"
        "from smartformer import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    cli.main(['pretrain', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    # pretrain's help lists the shipped presets, read from the one torch-free place that holds them
    assert all(name in out for name in ("tiny", "base", "paper", "vit_tiny"))


def test_config_package_loads_its_loader_on_first_use() -> None:
    """``smartformer.config`` names the presets without torch; ``load_config`` (models, torch) comes on use."""
    probe = (
        "import sys\n"
        "import smartformer.config as c\n"
        "print('torch' in sys.modules, c.available_presets()[:1])\n"
        "print(list(c.load_config('tiny').data.roi), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["False ['base']", "[64, 64, 64] True"]
