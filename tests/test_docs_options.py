"""Every option of every daemon is documented: README.md or docs/operations.md names it.

The options come from the usage.Options classes themselves (``optParameters``, ``optFlags``
and ``opt_`` methods, inherited ones included), so an option added to a daemon without a
word in the docs fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python import reflect, usage

from skyproto import tap

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "operations.md"]
DAEMONS: dict[str, type[usage.Options]] = {
    "skymaster": tap.MasterOptions, "skynode": tap.NodeOptions,
    "skymapper": tap.MapperOptions}


def options_of(cls: type[usage.Options]) -> set[str]:
    """The long option names ``cls`` accepts, as ``--name``."""
    names: set[str] = set()
    for attribute in ("optParameters", "optFlags"):
        table: list[list[object]] = []
        reflect.accumulateClassList(cls, attribute, table)
        names.update(f"--{row[0]}" for row in table)
    names.update("--" + name[len("opt_"):].replace("_", "-")
                 for name in dir(cls) if name.startswith("opt_"))
    return names


def documented() -> str:
    return "\n".join(page.read_text() for page in PAGES)


def test_the_option_tables_are_read() -> None:
    assert {"--harbor", "--master", "--no-mapper", "--http", "--log-format", "--peer",
            "--service", "--version", "--help"} <= options_of(tap.NodeOptions)
    assert {"--store", "--listen", "--tls-dir"} <= options_of(tap.MasterOptions)
    assert {"--relaxed-command-check", "--packet-timeout"} <= options_of(tap.MapperOptions)


@pytest.mark.parametrize(("daemon", "option"), sorted(
    (daemon, option) for daemon, cls in DAEMONS.items() for option in options_of(cls)))
def test_every_option_is_documented(daemon: str, option: str) -> None:
    # the whole option, not a prefix of a longer one (--master in --master-listen)
    assert re.search(re.escape(option) + r"(?![\w-])", documented()), (
        f"twistd {daemon} {option} appears in neither README.md nor docs/operations.md")


def options_section() -> str:
    """docs/operations.md's "Options" section: one table per daemon."""
    text = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(r"^## Options\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, "docs/operations.md has no '## Options' section"
    return match.group(1)


def daemon_table(daemon: str) -> str:
    """The rows of ``twistd <daemon>``'s table in the Options section."""
    match = re.search(rf"^\*\*`twistd {daemon}`\*\*.*?\n\n((?:\|[^\n]*\n)+)", options_section(),
                      re.M | re.S)
    assert match, f"the Options section has no table for twistd {daemon}"
    return match.group(1)


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_each_daemon_has_a_table_of_all_its_options(daemon: str) -> None:
    rows = daemon_table(daemon)
    listed = set(re.findall(r"^\| `(--[\w-]+)", rows, re.M))
    assert listed == options_of(DAEMONS[daemon]), (
        f"twistd {daemon}: missing {sorted(options_of(DAEMONS[daemon]) - listed)}, "
        f"not an option {sorted(listed - options_of(DAEMONS[daemon]))}")


def test_the_service_help_lists_every_built_in() -> None:
    from skyproto.services import BUILTIN

    help_text = " ".join(tap.NodeOptions().docs["service"].split())
    for name in BUILTIN:
        assert name in help_text


def test_operations_does_not_deny_the_advertise_option() -> None:
    text = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert "no separate \"advertise\" option" not in text
    assert "--advertise" in text
