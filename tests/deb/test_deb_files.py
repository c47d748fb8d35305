"""The files under debian/ agree with the code and with each other (no build, no root needed).

The version, the unit's command line and user, the packaged configuration, the opt-in table
the build generates and the wiring README.Debian gives are each defined in one place and
used in another; these tests fail when one side changes without the other.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
from lab.policyd import config_from_example
from lab.postfix import main_cf_value

from policyd_ipv6 import __version__
from policyd_ipv6.daemon.config import DEFAULT_CONFIG_PATH, parse_config

from . import debbuild, readme_debian
from .debbuild import require
from .unitrun import Unit

DEBIAN = debbuild.DEBIAN
EXAMPLES = debbuild.REPO / "postfix-examples"
SOCKET_DIR = "/var/spool/postfix/policyd-ipv6"


def packaged(name: str) -> str:
    return (DEBIAN / name).read_text()


def test_every_python_package_is_built_into_the_deb():
    """pyproject.toml's package list names every directory of policyd_ipv6 that holds an
    __init__.py: a package left out is missing from the .deb, and the command fails there."""
    listed = set(tomllib.loads((debbuild.REPO / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(debbuild.REPO).parts)
             for init in (debbuild.REPO / "policyd_ipv6").rglob("__init__.py")}
    assert sorted(found - listed) == []


def test_build_dependencies_cover_the_runtime_python_libraries():
    """Every python3-* library the package Depends on is a Build-Depends (<!nocheck>) too: the
    unit tests run at build time and import them."""
    control = packaged("control")
    source, binary = control.split("\nPackage:", 1)

    def field(stanza: str, name: str) -> set[str]:
        match = re.search(r"^%s:(.*?)(?=^\S)" % name, stanza + "\nEnd:", re.M | re.S)
        return {entry.split()[0] for entry in match.group(1).replace("\n", " ").split(",")
                if entry.strip()} if match else set()

    needed = {name for name in field(binary, "Depends") if name.startswith("python3-")}
    assert sorted(needed - field(source, "Build-Depends")) == []


def test_package_depends_on_a_postfix_with_smtpd_milter_maps():
    """The package Depends on postfix (>= 3.2), the only client of its Unix sockets and the
    owner of the user milter_peer_users names (without it the service does not start); it is
    not merely recommended."""
    binary = packaged("control").split("\nPackage:", 1)[1] + "\nEnd:"
    fields = {name: " ".join(value.split()) for name, value in
              re.findall(r"^([\w-]+):(.*?)(?=^[\w#-])", binary, re.M | re.S)}
    assert "postfix (>= 3.2)" in [entry.strip() for entry in fields["Depends"].split(",")]
    assert "postfix" not in fields.get("Recommends", "")


def test_changelog_version_is_the_program_version():
    """debian/changelog's upstream version (before the Debian revision) is __version__."""
    version = debbuild.changelog_version()
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    assert upstream == __version__, "debian/changelog says %s, policyd_ipv6 %s" % (
        version, __version__)


def test_unit_runs_the_default_configuration_as_the_user_postinst_creates():
    """The unit starts `policyd-ipv6 serve --config <default path>` as the user postinst adds,
    and reloads with the program's own `reload --config <default path> --pid $MAINPID` (no
    /bin/kill on minbase; a configuration that would not load fails the reload)."""
    unit = Unit.read(DEBIAN / "policyd-ipv6.service")
    assert unit.exec_start == ["/usr/bin/policyd-ipv6", "serve", "--config", DEFAULT_CONFIG_PATH]
    assert unit.user not in ("root", "0") and unit.group == unit.user
    script = packaged("policyd-ipv6.postinst").replace("\\\n", " ")  # join continued lines
    (adduser,) = [line.split() for line in script.splitlines() if "adduser --system" in line]
    assert "--group" in adduser and adduser[-1] == unit.user
    assert "--gecos" not in adduser, "deprecated in Debian 13's adduser"
    assert unit.exec_reload == ["/usr/bin/policyd-ipv6", "reload", "--config",
                                DEFAULT_CONFIG_PATH, "--pid", "$MAINPID"]
    assert unit.one("Restart") == "on-failure"


def test_unit_sandbox_settings():
    """The unit keeps the hardening the package promises (issue: as strict as still works)."""
    unit = Unit.read(DEBIAN / "policyd-ipv6.service")
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
                       "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes"}.items():
        assert unit.one(key) == value, key
    assert unit.settings["CapabilityBoundingSet"] == [""]
    assert "@system-service" in unit.settings["SystemCallFilter"]
    assert unit.settings["ReadWritePaths"] == ["-" + SOCKET_DIR], "the sockets' directory only"


def test_sockets_directory_is_made_by_tmpfiles_and_before_each_start():
    """debian/policyd-ipv6.tmpfiles makes /var/spool/postfix/policyd-ipv6 owned by the unit's
    user, group postfix, set-group-ID 2750; the unit runs the same entry as root before each
    start (a Postfix installed later brings its group), and a failure there does not hide the
    daemon's own message."""
    unit = Unit.read(DEBIAN / "policyd-ipv6.service")
    lines = [line.split() for line in packaged("policyd-ipv6.tmpfiles").splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == [["d", SOCKET_DIR, "2750", unit.user, "postfix", "-"]]
    assert unit.settings["ExecStartPre"] == [
        "-+/usr/bin/systemd-tmpfiles --create policyd-ipv6.conf"]


def test_packaged_configuration_listens_on_unix_sockets_and_finds_the_optin_file():
    """The example config installed as /etc/policyd-ipv6/policyd-ipv6.toml resolves optin_file
    to /etc/policyd-ipv6/optin-domains, listens (policy and milter) on Unix sockets of mode 660
    with a lock file in the unit's writable directory, and names no user."""
    install = packaged("policyd-ipv6.install").split("\n")
    assert "postfix-examples/policyd-ipv6.toml etc/policyd-ipv6/" in install
    assert "debian/build/optin-domains usr/share/policyd-ipv6/" in install  # a template
    config = parse_config((EXAMPLES / "policyd-ipv6.toml").read_text(), "/etc/policyd-ipv6")
    assert config.optin_file == "/etc/policyd-ipv6/optin-domains"
    assert config.listen == ("unix:%s/policy:mode=660:lockfile=1" % SOCKET_DIR,)
    assert config.milter_listen == ("unix:%s/milter:mode=660:lockfile=1" % SOCKET_DIR,)
    # The unit already runs as its own user: a non-root process cannot switch to another.
    assert config.user == ""


def test_readme_debian_wiring_is_the_examples_wiring():
    """README.Debian's main.cf lines set the restrictions of postfix-examples/main.cf.fragment."""
    readme = readme_debian.main_cf_lines(packaged("README.Debian"))
    fragment = (EXAMPLES / "main.cf.fragment").read_text()
    name = "smtpd_recipient_restrictions"
    assert main_cf_value(readme, name) == main_cf_value(fragment, name)
    assert "unix:policyd-ipv6/policy," in main_cf_value(readme, name)


def test_readme_debian_milter_wiring_is_the_examples_wiring():
    """README.Debian's milter lines are the example fragment's (commented) milter lines, its
    map is policyd-ipv6-milter.cidr's entries exactly, and its milter_listen line is a key
    the packaged configuration accepts, on a Unix socket the map names."""
    readme = packaged("README.Debian")
    lines = readme_debian.milter_main_cf_lines(readme)
    fragment = (EXAMPLES / "main.cf.fragment").read_text()
    for name in ("smtpd_milter_maps", "milter_protocol"):
        commented = [line[1:] for line in fragment.splitlines() if line.startswith("#" + name)]
        assert commented, "main.cf.fragment no longer shows %s" % name
        assert main_cf_value(lines, name) == main_cf_value(commented[0], name)
    assert "milter_default_action" not in lines
    entries = [line for line in (EXAMPLES / "policyd-ipv6-milter.cidr").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shown = [line.strip() for line in readme.splitlines()
             if line.strip().startswith(("::/0 ", "0.0.0.0/0 "))]
    assert shown == entries and len(entries) == 2
    (listen,) = [line.strip() for line in readme.splitlines()
                 if line.strip().startswith("milter_listen = ")]
    example = (EXAMPLES / "policyd-ipv6.toml").read_text()
    assert "\n%s\n" % listen in example, "README.Debian shows the packaged milter_listen"
    config = parse_config(example, "/etc/policyd-ipv6")
    assert config.milter_listen == ("unix:%s/milter:mode=660:lockfile=1" % SOCKET_DIR,)
    assert all("unix:policyd-ipv6/milter," in entry for entry in entries)


def test_readme_debian_tcp_recipe_is_consistent():
    """README.Debian's TCP alternative is a listen value the configuration accepts and the
    main.cf endpoint of that same port, in the restrictions' own form."""
    recipe = readme_debian.tcp_recipe(packaged("README.Debian"))
    example = (EXAMPLES / "policyd-ipv6.toml").read_text()
    config = parse_config(config_from_example(example, {"listen": recipe["listen"]}),
                          "/etc/policyd-ipv6")
    (endpoint,) = config.listen
    port = re.fullmatch(r"tcp:(\d+):interface=127\.0\.0\.1", endpoint).group(1)
    assert recipe["check_policy_service"] == (
        "check_policy_service { inet:127.0.0.1:%s, timeout=30s }" % port)


@pytest.mark.process
def test_build_generates_an_optin_table_without_domains(tmp_path):
    """debian/rules turns the example opt-in file into one that keeps its comments and opts
    no domain in; a domain left in it would stop the build."""
    require(None if shutil.which("make") else "make is not installed (Debian package make)")
    (tmp_path / "debian").mkdir()
    shutil.copy(DEBIAN / "rules", tmp_path / "debian" / "rules")
    (tmp_path / "postfix-examples").mkdir()
    sample = (EXAMPLES / "optin-domains").read_text()
    (tmp_path / "postfix-examples" / "optin-domains").write_text(sample)
    run = subprocess.run(["make", "-s", "-f", "debian/rules", "execute_after_dh_auto_build"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    built = (tmp_path / "debian" / "build" / "optin-domains").read_text().splitlines()
    assert [line for line in built if line.strip() and not line.lstrip().startswith("#")] == []
    comments = [line for line in sample.splitlines() if line.lstrip().startswith("#")]
    assert comments and built[:len(comments)] == comments
    assert any(not ln.strip().startswith("#") and ln.strip() for ln in sample.splitlines()), \
        "the example opts a domain in; this test would prove nothing without one"

    # A rule that lets a domain through must fail the build.
    (tmp_path / "postfix-examples" / "optin-domains").write_text("# x\n")
    rules = (tmp_path / "debian" / "rules").read_text().replace(
        "> $(OPTIN_BUILT)\n", "> $(OPTIN_BUILT)\n\techo leaked.example >> $(OPTIN_BUILT)\n", 1)
    (tmp_path / "debian" / "rules").write_text(rules)
    run = subprocess.run(["make", "-s", "-f", "debian/rules", "execute_after_dh_auto_build"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0 and "leaked.example" in run.stdout + run.stderr
