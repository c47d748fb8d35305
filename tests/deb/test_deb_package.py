"""The Debian package: built from a copy of the tree, lintian-clean, installed with apt-get,
working from /usr/bin on Debian's own libraries, and purged without a trace but its user.

The tests run in file order and the last one purges the package; the lab scenarios with the
installed daemon are in test_deb_lab.py (which pytest runs before this module).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from e2e import topology as T
from lab.knot import KnotServer, free_port, require_knot
from lab.policyd import config_from_example

from . import debbuild
from .debbuild import debian_env, require
from .expect import CONFIG, ETC, FAKE_DKIM_KEY, NO_AUTH, NO_PTR, NOT_OPTED, OPTIN, README_DEBIAN
from .unitrun import UNIT_PATH, Unit

pytestmark = pytest.mark.deb


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A command with the environment a service or an administrator's shell would have."""
    return subprocess.run(argv, capture_output=True, text=True, env=debian_env(), cwd="/",
                          **kwargs)


def test_build_gives_one_architecture_independent_package(package):
    """dpkg-buildpackage makes policyd-ipv6_<changelog version>_all.deb depending on Debian's
    python3-twisted, python3-dnspython, python3-spf and python3-dkim."""
    assert package.build.deb.name == "%s_%s_all.deb" % (debbuild.PACKAGE,
                                                       debbuild.changelog_version())
    depends = run(["dpkg-deb", "-f", str(package.build.deb), "Depends"]).stdout
    names = {re.split(r"[ (:]", d.strip())[0] for d in depends.split(",")}
    assert {"python3-twisted", "python3-dnspython", "python3-spf", "python3-dkim",
            "adduser", "python3"} <= names, depends


def test_lintian_reports_no_errors_or_warnings(package):
    """lintian finds no error and no warning in the built package (overrides carry a reason)."""
    result = debbuild.lintian(package.build.changes)
    print(result.stdout)  # shown with -rA; the info tags are worth reading
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


def test_package_ships_command_unit_manuals_and_one_conffile(package, tmp_path):
    """The .deb holds the command, the private module under /usr/share/policyd-ipv6, the unit,
    both man pages, README.Debian and the opt-in table's template, and exactly one conffile
    (the configuration; the opt-in table is data postinst makes); no tests, no byte code."""
    listing = run(["dpkg-deb", "-c", str(package.build.deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    # debhelper puts the unit under /lib on Debian 12 and under /usr/lib on Debian 13.
    assert {"/lib/systemd/system/policyd-ipv6.service",
            "/usr/lib/systemd/system/policyd-ipv6.service"} & paths, "the unit"
    for expected in ("/usr/bin/policyd-ipv6",
                     "/usr/share/policyd-ipv6/policyd_ipv6/daemon/cli.py",
                     "/usr/share/policyd-ipv6/optin-domains",
                     "/usr/share/man/man8/policyd-ipv6.8.gz",
                     "/usr/share/man/man5/policyd-ipv6.toml.5.gz",
                     str(CONFIG)):
        assert expected in paths, expected
    assert {str(README_DEBIAN), str(README_DEBIAN) + ".gz"} & paths
    assert not [p for p in paths if "/tests/" in p or "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in paths if "/dist-packages/" in p], "the module is private"
    run(["dpkg-deb", "-e", str(package.build.deb), str(tmp_path / "control")])
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    assert conffiles == [str(CONFIG)]


def test_installed_command_runs_on_debians_libraries(installed):
    """/usr/bin/policyd-ipv6 --version prints the program's version, and its interpreter takes
    Twisted, dnspython, pyspf, dkimpy and the program itself from Debian packages."""
    version = run(["/usr/bin/policyd-ipv6", "--version"])
    upstream = debbuild.changelog_version().rsplit("-", 1)[0]
    assert (version.returncode, version.stdout.strip()) == (0, "policyd-ipv6 " + upstream)
    shebang = Path("/usr/bin/policyd-ipv6").read_text().splitlines()[0]
    assert shebang == "#! /usr/bin/python3" or shebang == "#!/usr/bin/python3", shebang
    probe = run(["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, "
                 "'/usr/share/policyd-ipv6'); import json, twisted, dns, spf, dkim, policyd_ipv6; "
                 "print(json.dumps({m.__name__: m.__file__ for m in "
                 "(twisted, dns, spf, dkim, policyd_ipv6)}))"])
    files = json.loads(probe.stdout)
    owners = {}
    for module, path in files.items():
        owner = run(["dpkg-query", "-S", path])
        assert owner.returncode == 0, "%s (%s) belongs to no Debian package" % (module, path)
        owners[module] = owner.stdout.split(":")[0]
    assert owners == {"twisted": "python3-twisted", "dns": "python3-dnspython",
                      "spf": "python3-spf", "dkim": "python3-dkim",
                      "policyd_ipv6": debbuild.PACKAGE}


def test_installation_creates_the_units_system_user(installed):
    """Installing creates the unit's User= as a system account and group, without home or shell."""
    unit = Unit.read(UNIT_PATH)
    user = pwd.getpwnam(unit.user)
    assert 0 < user.pw_uid < 1000, user
    assert grp.getgrgid(user.pw_gid).gr_name == unit.group
    assert user.pw_dir == "/nonexistent" and not os.path.exists(user.pw_dir)
    assert user.pw_shell in ("/usr/sbin/nologin", "/bin/false")


def test_installed_configuration_opts_no_domain_in(installed):
    """The installed opt-in table is comments only (a copy of the template, not a conffile),
    and the installed config listens on the Unix socket /var/spool/postfix/policyd-ipv6/policy,
    reads that table next to itself and names no user."""
    lines = [line.strip() for line in OPTIN.read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == []
    assert any(line.startswith("#") for line in lines)
    config = tomllib.loads(CONFIG.read_text())
    assert config["listen"] == ["unix:/var/spool/postfix/policyd-ipv6/policy:mode=660:lockfile=1"]
    assert config["optin_file"] == "optin-domains" and config.get("user", "") == ""
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", debbuild.PACKAGE]).stdout
    assert [line.split()[0] for line in conffiles.strip().splitlines()] == [str(CONFIG)]
    assert OPTIN.read_text() == Path("/usr/share/policyd-ipv6/optin-domains").read_text()


@pytest.fixture
def knot_on_loopback():
    """The lab's zones (e2e/topology.py) served by Knot on 127.0.0.1, on a free port."""
    require_knot()
    port = free_port()
    with KnotServer(T.zones(FAKE_DKIM_KEY), [("127.0.0.1", port)]) as server:
        yield server, port


def test_check_with_the_packaged_configuration_against_local_dns(installed, knot_on_loopback,
                                                                 tmp_path):
    """/usr/bin/policyd-ipv6 check, with the installed config changed only to ask a Knot on
    loopback and to opt example.com in, gives DUNNO, 4.7.25, 4.7.26 and 5.2.1 as it should."""
    _server, port = knot_on_loopback
    optin = tmp_path / "optin-domains"
    optin.write_text("%s\n" % T.OPTED_IN)
    config = tmp_path / "policyd-ipv6.toml"
    config.write_text(config_from_example(CONFIG.read_text(), {
        "nameservers": ["127.0.0.1:%d" % port], "optin_file": str(optin)}))
    cases = [
        (T.GOOD, T.OPTED_IN, "DUNNO"),
        (T.NOPTR, T.OPTED_IN, NO_PTR % T.NOPTR),
        (T.OUTSIDE, T.OPTED_IN, NO_AUTH % T.OUTSIDE),
        (T.GOOD, T.NOT_OPTED_IN, NOT_OPTED % T.NOT_OPTED_IN),
        (T.IPV4, T.NOT_OPTED_IN, "DUNNO"),
    ]
    for address, domain, reply in cases:
        result = run(["/usr/bin/policyd-ipv6", "check", "--config", str(config),
                      "--client-address", address, "--sender", T.SENDER, "--helo", T.HELO,
                      "--recipient", "bob@" + domain], timeout=60)
        # check's exit status follows the reply: 0 DUNNO, 4 temporary, 5 permanent refusal
        assert result.returncode == {"D": 0, "4": 4, "5": 5}[reply[0]], result.stderr
        assert result.stdout.splitlines()[0] == "action=" + reply, result.stdout


def test_unit_file_passes_systemd_analyze_verify(installed):
    """systemd-analyze verify accepts the installed unit: syntax, ExecStart, man pages."""
    require(None if shutil.which("systemd-analyze") else
            "systemd-analyze is not installed (Debian package systemd)")
    # verify runs man(1) for each Documentation= page, and man-db caches what it formats:
    # remove those cache files again, they are this test's, not the package's.
    cache = Path("/var/cache/man")
    cached_before = set(cache.rglob("*")) if cache.is_dir() else set()
    try:
        result = run(["systemd-analyze", "verify", str(UNIT_PATH)])
    finally:
        for path in (set(cache.rglob("*")) if cache.is_dir() else set()) - cached_before:
            if path.is_file():
                path.unlink()
    output = result.stdout + result.stderr
    assert result.returncode == 0 and UNIT_PATH.name not in output, output


def test_unit_sandbox_is_rated_ok(installed):
    """systemd-analyze security rates the installed unit's exposure at 2.0 ("OK") or better."""
    require(None if shutil.which("systemd-analyze") else
            "systemd-analyze is not installed (Debian package systemd)")
    result = run(["systemd-analyze", "security", "--offline=yes", str(UNIT_PATH)])
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_purge_removes_everything_but_the_system_user(installed):
    """apt-get purge removes the program, the unit and its enablement, the conffiles and
    /etc/policyd-ipv6, and dpkg's and apt's records of the package; the system user stays."""
    user = Unit.read(UNIT_PATH).user
    installed.purge()
    assert debbuild.installed_version() is None
    assert run(["dpkg-query", "-W", debbuild.PACKAGE]).returncode != 0, "dpkg still knows it"
    assert not ETC.exists()
    left = debbuild.system_paths_named() - installed.paths_before
    assert left == set(), "left behind after purge: %s" % sorted(left)
    states = Path("/var/lib/apt/extended_states")
    if states.exists():
        assert "Package: %s\n" % debbuild.PACKAGE not in states.read_text()
    assert pwd.getpwnam(user).pw_uid > 0
    print("timings (s): %s" % {k: round(v, 1) for k, v in installed.timings.items()})
