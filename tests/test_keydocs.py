"""The generated key documentation is never stale, and the generator sees a stale file."""

from __future__ import annotations

import shutil
from pathlib import Path

from policyd_ipv6.daemon import keydocs
from policyd_ipv6.daemon.config import KEYS

ROOT = Path(__file__).resolve().parents[1]


def test_generated_key_documentation_is_up_to_date():
    """README's key table, policyd-ipv6.toml(5)'s KEYS and both samples' comments equal what
    the Config fields generate (python3 -m policyd_ipv6.daemon.keydocs --write fixes them)."""
    stale = [str(path.relative_to(ROOT))
             for path, (current, wanted) in keydocs.expected(ROOT).items() if current != wanted]
    assert stale == [], "stale: run python3 -m policyd_ipv6.daemon.keydocs --write"


def test_check_reports_a_stale_copy_and_write_fixes_it(tmp_path, capsys):
    """--check exits 1 naming a file whose key documentation was edited; --write restores it."""
    for name, _render in keydocs.TARGETS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    page = tmp_path / "policyd_ipv6/man/policyd-ipv6.toml.5"
    page.write_text(page.read_text().replace("Between 1 and 5.", "Between 1 and 9."))
    assert keydocs.main(["--check", "--root", str(tmp_path)]) == 1
    assert "policyd-ipv6.toml.5" in capsys.readouterr().out
    assert keydocs.main(["--write", "--root", str(tmp_path)]) == 0
    assert page.read_text() == (ROOT / "policyd_ipv6/man/policyd-ipv6.toml.5").read_text()
    assert keydocs.main(["--check", "--root", str(tmp_path)]) == 0


def test_sample_keeps_its_values_and_adds_missing_keys_at_their_default():
    """Regenerating a sample keeps a value the file chose, says the default, adds absent keys."""
    text = '# header\n\n# old comment\nrdns = "fcrdns"\n\n# trailer\n'
    out = keydocs.sample_comments(text)
    assert out.startswith("# header\n\n") and out.endswith("# trailer\n")
    assert 'rdns = "fcrdns"' in out and "old comment" not in out
    assert '(Default: "ptr".)' in out
    assert "milter_peer_users = [\"root\", \"postfix\"]" in out
    for key in KEYS:
        if not isinstance(key.default, dict):  # [replies]: the file's own closing comment
            assert f"\n{key.name} = " in out, key.name


def test_restart_keys_say_so_everywhere():
    """Each restart-only key's generated text ends with "Changing it needs a restart."."""
    for key in KEYS:
        assert keydocs.description(key).endswith(keydocs.RESTART) == key.restart, key.name
