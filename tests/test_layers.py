"""The import layers (docs/api.md): model/ imports nothing of the project outside itself; the
library imports no front end and not the command line (utils/cli.py); a front end imports no
other front end; inside utils/, the glue at its top imports no room, and each room imports only
the rooms below it (ROOMS) and the pure leaves. Read off the sources with ``ast``, so a lazy import
inside a function counts."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = {"train", "test", "predict", "app", "export"}  # the top-level scripts
SCRIPTS = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
           if p.stem not in ("__init__", "common")} | {
    "dataset.make_dataset_new", "dataset.make_meta"}
PROJECT = {"model", "utils", "dataset", "bench", "tests", *FRONT_ENDS}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(path: Path) -> set[str]:
    """The project modules that ``path`` imports (absolute names; relative ones resolved)."""
    package = module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            name = f"{base}.{node.module}" if base and node.module else (node.module or base)
            found.add(name)
    return {n for n in found if n.split(".")[0] in PROJECT}


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def is_front_end(name: str) -> bool:
    return name in FRONT_ENDS or name in SCRIPTS


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: p.name)
def test_model_imports_nothing_of_the_project_outside_itself(path):
    outside = {n for n in imports(path) if n.split(".")[0] != "model"}
    assert not outside, f"{path.name} imports {outside}"


LIBRARY = [p for p in sources("utils", "dataset") if not is_front_end(module_name(p))]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: module_name(p))
def test_the_library_imports_no_front_end_and_not_the_command_line(path):
    if module_name(path) == "utils.cli":  # the command line itself is the front ends' layer
        bad = {n for n in imports(path) if is_front_end(n) or n.split(".")[0] in ("bench", "tests")}
    else:
        bad = {n for n in imports(path) if is_front_end(n) or n == "utils.cli"
               or n.split(".")[0] in ("bench", "tests")}
    assert not bad, f"{module_name(path)} imports {bad}"


# utils/'s rooms and the rooms each may import; serving is the top, data the bottom. inference and
# scoring use each other (the prediction service runs a strategy; a strategy runs a runtime).
ROOMS = {"data": set(), "inference": {"data", "scoring"}, "scoring": {"data", "inference"},
         "evaluation": {"data", "inference", "scoring"},
         "serving": {"data", "inference", "scoring"}}
# pure modules over arrays and files that any room may use; they import only the glue
LEAVES = {"utils.evaluation.metrics", "utils.evaluation.visualize", "utils.evaluation.calibration"}


def room(name: str) -> str | None:
    """``utils.<room>[.<module>]`` -> the room; the glue at utils/'s top and other names -> None."""
    parts = name.split(".")
    return parts[1] if parts[0] == "utils" and len(parts) > 1 and parts[1] in ROOMS else None


UTILS = [p for p in sources("utils") if p.name != "__init__.py" or p.parent.name in ROOMS]


@pytest.mark.parametrize("path", UTILS, ids=lambda p: module_name(p))
def test_each_room_of_utils_imports_only_the_rooms_below_it(path):
    name, found = module_name(path), imports(path)
    mine = room(name)
    if name == "utils.cli":  # the front ends' layer, checked above
        return
    if mine is None or name in LEAVES:  # the glue and the leaves import no room at all
        bad = {n for n in found if room(n)}
    else:
        bad = {n for n in found if room(n) and room(n) not in ROOMS[mine] | {mine}
               and n not in LEAVES}
    assert not bad, f"{name} imports {bad}"


def test_utils_top_level_is_small_glue():
    """The top of utils/ holds at most 8 modules beside its rooms (issue: the house)."""
    top = sorted(p.stem for p in (ROOT / "utils").glob("*.py"))
    assert len(top) <= 8, top
    assert set(ROOMS) | {"scoring"} <= {p.name for p in (ROOT / "utils").iterdir() if p.is_dir()}


FRONT_END_FILES = [ROOT / f"{n}.py" for n in sorted(FRONT_ENDS)] + [
    ROOT / (n.replace(".", "/") + ".py") for n in sorted(SCRIPTS)]


@pytest.mark.parametrize("path", FRONT_END_FILES, ids=lambda p: module_name(p))
def test_front_ends_import_no_front_end(path):
    bad = {n for n in imports(path) if is_front_end(n)}
    assert not bad, f"{module_name(path)} imports {bad}"


def test_the_rule_is_checked_on_a_violation(tmp_path, monkeypatch):
    """The checker sees a front end imported inside a function."""
    fake = ROOT / "utils" / "_layer_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "def f():\n    import predict\n"
                        if self == fake else Path.read_bytes(self).decode())
    assert imports(fake) == {"predict"}
