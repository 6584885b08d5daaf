"""The documentation site (docs/, mkdocs.yml) against the code: a page for every command,
generated from it; every error the troubleshooting page quotes still raised somewhere; and the
repository root holding only what a Python project's root holds. CI also builds the site with
`mkdocs build --strict` (.ci/run): broken links, missing API objects and warnings fail there."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COMMANDS = [command.name or command.callback.__name__ for command in
            __import__("fmconvert.cli", fromlist=["app"]).app.registered_commands]


def test_the_registry_of_commands_is_what_the_site_documents():
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (DOCS / "commands" / "index.md").read_text()
    pages = sorted(p.stem for p in (DOCS / "commands").glob("*.md") if p.stem != "index")
    assert pages == sorted(COMMANDS)
    for name in COMMANDS:
        assert f"commands/{name}.md" in nav and f"]({name}.md)" in index, name


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_page_renders_the_command_from_the_code(name):
    import fmconvert.cli

    import importlib.util

    page = (DOCS / "commands" / f"{name}.md").read_text()
    assert f"<!-- fmconvert-command: {name} -->" in page
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    rendered = hooks.on_page_markdown(page)
    command = getattr(fmconvert.cli, f"{name}_command")
    options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]  # as --help lists them
    assert command.name == name and options
    for option in options:  # every option the command declares, as --help names it
        assert f"`{option.opts[0]}" in rendered or f", {option.opts[0]}" in rendered, option.opts


def _sources() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "fmconvert").rglob("*.py"))


def test_every_error_the_troubleshooting_page_quotes_is_still_raised():
    page = (DOCS / "troubleshooting.md").read_text()
    fragments = re.findall(r'<!-- source: "(.*?)" -->', page)
    entries = re.findall(r"^### ", page, re.M)
    assert len(fragments) == len(entries) >= 20  # one source per entry
    code = _sources()
    missing = [f for f in fragments if f.replace('\\"', '"') not in code]
    assert not missing, f"troubleshooting.md quotes errors fmconvert no longer raises: {missing}"


def test_the_repository_root_holds_only_a_python_projects_files():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    top = {line.split("/", 1)[0] for line in tracked.stdout.splitlines()}
    allowed = {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml", ".gitignore", ".ci", "fmconvert",
               "tests", "scripts", "docs"}
    assert top <= allowed, f"files at the repository root beyond a project's own: {sorted(top - allowed)}"


def test_every_page_of_the_site_is_in_its_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    missing = sorted(p for p in pages if p not in nav)
    assert not missing, f"pages no one can reach from the site's navigation: {missing}"
