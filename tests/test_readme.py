"""The commands of the README and of docs/ are the ones that exist, and their links lead somewhere:
no drift between docs, scripts, Makefile and CI."""
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
MANUAL = [ROOT / "README.md"] + DOCS  # every page whose commands and links are checked


def shell_lines(text: str) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [l.split("#")[0].strip() for l in joined.splitlines() if l.strip()]
    return [l for l in lines if l]


def script_calls(lines):
    """(script, flags) for every python/torchrun call of a repository script."""
    for line in lines:
        words = shlex.split(line)
        scripts = [w for w in words if w.endswith(".py") and (ROOT / w).is_file()]
        if scripts and words[0] in ("python", "$PYTHON", "torchrun"):
            after = words[words.index(scripts[0]) + 1:]
            yield scripts[0], [w.split("=")[0] for w in after if w.startswith("--")]


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    run = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


SHELL_FILES = ["test.sh", "train.sh", "demo.sh"]
CALLS = sorted(set((s, tuple(f)) for page in MANUAL
                   for s, f in script_calls(shell_lines(page.read_text()))) |
               set((s, tuple(f)) for name in SHELL_FILES if (ROOT / name).exists()
                   for s, f in script_calls(shell_lines("```bash\n" + (ROOT / name).read_text()
                                                        + "```"))))


def test_the_readme_names_the_commands_ci_runs():
    assert "make test" in README and "make demo" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\n\t.*pytest -q tests", makefile, flags=re.M)
    assert re.search(r"^demo:.*\n\t.*bash demo.sh", makefile, flags=re.M)
    assert "python -m pytest -q tests" in README


def test_every_script_call_is_found():
    scripts = {s for s, _ in CALLS}
    assert {"test.py", "train.py", "predict.py", "dataset/make_dataset_new.py",
            "dataset/make_meta.py"} <= scripts


@pytest.mark.subprocess
@pytest.mark.parametrize("script,flags", CALLS, ids=[f"{s} {' '.join(f)}"[:60] for s, f in CALLS])
def test_every_flag_in_readme_and_shell_scripts_exists(script, flags):
    known = help_text(script)
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", known)]
    assert not missing, f"{script} does not accept {missing}"


def test_shell_scripts_exist_and_are_referenced():
    for name in ("test.sh", "train.sh"):
        assert (ROOT / name).exists() and f"bash {name}" in README


def test_the_readme_links_every_docs_page():
    linked = {target.split("#")[0] for _, target in markdown_links(README)}
    assert DOCS and not [d.name for d in DOCS if f"docs/{d.name}" not in linked]


def outside_code(text: str) -> str:
    """The text without fenced blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def markdown_links(text: str) -> list[tuple[str, str]]:
    """(text, target) of every inline link and image outside code."""
    return re.findall(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", outside_code(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lower-case, every character
    but letters, digits, '_', '-' and spaces dropped, spaces to '-'."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.sub(r"^```.*?^```", "", text,
                                                                      flags=re.S | re.M),
                              flags=re.M):
        s = slug(heading)
        out.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return out


def test_slug_follows_githubs_rules():
    assert slug("The inspection page: `app.py`") == "the-inspection-page-apppy"
    assert slug("Export to ONNX and deploy: `export.py`, `predict.py --onnx`") == \
        "export-to-onnx-and-deploy-exportpy-predictpy---onnx"
    assert slug("Resume: a run that stops is not lost *(ours)*") == \
        "resume-a-run-that-stops-is-not-lost-ours"
    assert anchors("# A\n## A\n```bash\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("page", MANUAL, ids=[p.relative_to(ROOT).as_posix() for p in MANUAL])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for _, target in markdown_links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        name = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
        if not file.exists():
            broken.append(f"{target}: no file {name}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {name}")
    assert not broken, broken
