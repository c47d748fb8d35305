"""Replies written at once (connection.write_now) reach real clients whole and in order, over
TCP and a Unix socket, one request at a time and pipelined, against the daemon process."""

import socket

import pytest
from lab.daemonproc import ServeProcess, ask, request

pytestmark = pytest.mark.process

END = b"\n\n"
REFUSED = "550 5.2.1 Service unavailable, [n{}.example] does not accept email over IPv6."


def requests(count: int) -> list[tuple[bytes, str]]:
    """IPv4 (DUNNO) and not-opted-in IPv6 (550) requests, alternating, with their replies."""
    out = []
    for i in range(count):
        if i % 2:
            out.append((request(client_address="2001:db8::7", recipient=f"a@n{i}.example",
                                instance=f"w{i}"), REFUSED.format(i)))
        else:
            out.append((request(client_address="192.0.2.7", instance=f"w{i}"), "DUNNO"))
    return out


def read_replies(sock: socket.socket, count: int) -> list[str]:
    sock.settimeout(10)
    data = b""
    while data.count(b"\n\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(data.split(END)) - 1} replies"
        data += chunk
    return [r[len(b"action="):].decode() for r in data.split(b"\n\n")[:count]]


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_replies_whole_and_in_order_one_at_a_time_and_pipelined(tmp_path, family):
    """Two hundred requests one at a time, then sixteen sent in one write, get their own
    replies, each whole and in the order asked, on TCP and on a Unix socket."""
    path = tmp_path / "policy.sock"
    settings = {"listen": [f"unix:{path}"]} if family == "unix" else None
    with ServeProcess(tmp_path, settings, optin="contoso.com\n") as proc:
        if family == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
        else:
            sock = proc.connect()
        with sock:
            for data, expected in requests(200):
                assert ask(sock, data) == expected
            batch = requests(16)
            sock.sendall(b"".join(data for data, _ in batch))
            assert read_replies(sock, 16) == [expected for _, expected in batch]
        assert proc.problems() == []
