"""serve refuses an opt-in file that is a FIFO or a device at once, naming the key and value,
instead of blocking on it."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("make, kind", [
    (os.mkfifo, "a FIFO"),
    (lambda path: os.symlink("/dev/zero", path), "a character device"),
])
def test_serve_refuses_a_special_optin_file(tmp_path, make, kind):
    """An opt-in path that is a FIFO or a device stops serve with exit 1 and a message naming
    optin_file, its value and what the file is, within seconds."""
    optin = tmp_path / "optin"
    make(str(optin))
    config = tmp_path / "p.toml"
    config.write_text(f'listen = ["tcp:0:interface=127.0.0.1"]\noptin_file = "{optin}"\n'
                      'nameservers = ["127.0.0.1:53"]\n')
    result = subprocess.run([sys.executable, "-m", "policyd_ipv6", "serve", "--config",
                             str(config), "--allow-root"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'optin_file = "{optin}"' in result.stderr
    assert f"not a regular file but {kind}" in result.stderr
