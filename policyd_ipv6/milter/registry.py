"""Which SMTP sessions have the built-in milter in their path, and what the policy side
decided about each session's current message.

Contract: one ``Sessions`` registry per process, shared by the milter (``milter_server``) and
the policy engine (``engine``); both run on the reactor thread, so nothing here locks.

- The milter calls ``register(connection)`` at SMFIC_CONNECT and gets a ``SessionState``
  (``None`` when the connection cannot be correlated: no client address or port, or a
  key another live connection already registered, which then stops matching too), then
  ``state.begin_message(sender)`` at MAIL FROM, ``state.skip_message()`` when it lets a
  message through at MAIL FROM, ``state.end_message()`` at ABORT (RSET, or a transaction
  that ends without data), ``state.take_message()`` at end of message, and
  ``remove(state)`` when the connection closes.
- The policy engine calls ``message_for(attributes)`` for each RCPT request. It returns the
  ``MessageRecord`` of the message the milter is collecting on the same SMTP connection, or
  ``None``: no milter session for this connection (milter not wired, down, or the entry
  evicted), no message open, or a sender different from the milter's MAIL FROM. ``None``
  means "no milter will decide at end of message", and the engine then enforces SPF alone at
  RCPT (the fail-safe). With a record it may answer DUNNO for an SPF failure
  (``Facts.dkim_pending``) and ``record()``s its verdict there for the milter.

How the two sides meet: the key is the SMTP client's address and port,
which the policy request carries (``client_address``, ``client_port``, Postfix 3.0+) and the
milter gets in SMFIC_CONNECT; when both sides also know the server's address and port
(``server_address``/``server_port``, 3.2+; ``{daemon_addr}``/``{daemon_port}``) they are part of
the key, so one daemon can serve several Postfix hosts. Postfix asks the policy at RCPT only
after the milter has seen that message's MAIL FROM, and sends the milter the end of message
(or ABORT) before the next MAIL FROM, so "the record opened at the milter's last MAIL FROM"
is always the message the policy request is about: no per-message id is needed, and the
policy connection a request arrives on (reopened or not) does not matter.

Bounds: at most ``max_sessions`` entries, least recently used evicted first, each expiring
``ttl_seconds`` after the milter last touched it. The milter adapter keeps its own
``SessionState``, so an evicted entry only makes later policy requests fall back to SPF alone,
never loses what the policy already recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from policyd_ipv6.cache import ExpiringCache
from policyd_ipv6.names import client_ip
from policyd_ipv6.vocabulary import Clock, PolicyRule

__all__ = ["Sessions", "SessionState", "MessageRecord", "SessionKey", "milter_key",
           "policy_key", "same_sender", "DKIM_PENDING_RULE", "PASS_RULE"]

# decision.RULES names the milter acts on.
DKIM_PENDING_RULE = PolicyRule.SPF_FAILED_DKIM_PENDING
# A PTR-exempt sender without PTR or SPF: a DKIM signature of its own domain must verify.
RDNS_PENDING_RULE = PolicyRule.NO_RDNS_DKIM_PENDING
PASS_RULE = PolicyRule.PASS


class SessionKey(NamedTuple):
    client: str
    client_port: int
    server: str | None = None  # both or neither of server and server_port
    server_port: int | None = None

    def without_server(self) -> SessionKey:
        return SessionKey(self.client, self.client_port)


def _address(text: str | None) -> str | None:
    # {client_addr}/{daemon_addr} may carry Postfix's "IPv6:" form; CONNECT has it bare.
    if not text:
        return None
    ip = client_ip(text.removeprefix("IPv6:").removeprefix("ipv6:"))
    return None if ip is None else str(ip)


def _port(value) -> int | None:
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _key(client, client_port, server, server_port) -> SessionKey | None:
    client, client_port = _address(client), _port(client_port)
    if client is None or client_port is None:
        return None
    server, server_port = _address(server), _port(server_port)
    if server is None or server_port is None:
        return SessionKey(client, client_port)
    return SessionKey(client, client_port, server, server_port)


def milter_key(connection) -> SessionKey | None:
    """The key of a milter ``Connection`` (SMFIC_CONNECT data and macros), or None."""
    macros = connection.macros
    return _key(connection.address, connection.port or macros.get("client_port"),
                macros.get("daemon_addr"), macros.get("daemon_port"))


def policy_key(attributes: Mapping[str, str]) -> SessionKey | None:
    """The key of a policy request, or None (Postfix before 3.0 sends no client_port)."""
    get = attributes.get
    return _key(get("client_address"), get("client_port"), get("server_address"),
                get("server_port"))


def same_sender(a: str | None, b: str | None) -> bool:
    """Whether two spellings of an envelope sender are the same ("<A@x>" and "a@x")."""
    if a is None or b is None:
        return False
    return a.strip().strip("<>").casefold() == b.strip().strip("<>").casefold()


class MessageRecord:
    """One message (MAIL FROM to end of message) on a milter connection, and the policy
    verdicts recorded for it. ``open`` is true while the milter will still decide it."""

    def __init__(self, sender: str) -> None:
        self.sender = sender.strip().strip("<>")
        self.open = True
        self.verdicts: dict[str, tuple] = {}  # rule -> (subject, facts), latest per rule
        # The refusal kinds every DKIM-pending recipient only reports (report mode,
        # report_only_rules): a refusal at end of message is only logged when all agree.
        self.reported: frozenset | None = None

    def record(self, subject, verdict, facts) -> None:
        """The policy engine's verdict for one recipient of this message."""
        self.verdicts[verdict.rule] = (subject, facts)
        if verdict.rule in (DKIM_PENDING_RULE, RDNS_PENDING_RULE):
            kinds = frozenset(getattr(verdict, "reported", ()))
            self.reported = kinds if self.reported is None else self.reported & kinds

    def reports(self, kind: str) -> bool:
        """Whether a refusal of this kind (a report_only_rules name) is only reported."""
        return self.reported is not None and kind in self.reported

    @property
    def concerned(self) -> bool:
        """True when the policy let this message through with a verdict the milter acts on."""
        return (DKIM_PENDING_RULE in self.verdicts or PASS_RULE in self.verdicts
                or RDNS_PENDING_RULE in self.verdicts)

    @property
    def needs_dkim(self) -> bool:
        """True when some recipient was let through only because DKIM may still pass."""
        return DKIM_PENDING_RULE in self.verdicts or RDNS_PENDING_RULE in self.verdicts

    @property
    def needs_aligned_dkim(self) -> bool:
        """True when the DKIM that passes must be the sender domain's (no PTR, no SPF)."""
        return RDNS_PENDING_RULE in self.verdicts

    def evidence(self):
        """(subject, facts) the end-of-message decision reports: those of the DKIM-pending
        verdict when there is one, else those of the pass verdict, else None."""
        return (self.verdicts.get(RDNS_PENDING_RULE) or self.verdicts.get(DKIM_PENDING_RULE)
                or self.verdicts.get(PASS_RULE))


class SessionState:
    """One milter connection's view of its SMTP session (held by the milter adapter)."""

    def __init__(self, key: SessionKey) -> None:
        self.key = key
        self.current: MessageRecord | None = None
        self.closed = False

    def begin_message(self, sender: str) -> MessageRecord | None:
        """MAIL FROM: a new message; whatever the previous one left is dropped."""
        self._drop()
        if not self.closed:
            self.current = MessageRecord(sender)
        return self.current

    def skip_message(self) -> None:
        """The milter let this message through at MAIL FROM: it will not see its end."""
        self._drop()

    def end_message(self) -> None:
        """ABORT (RSET, or the transaction ended without data): the message is gone."""
        self._drop()

    def take_message(self) -> MessageRecord | None:
        """End of message: the record (closed from now on), or None if there was none."""
        record, self.current = self.current, None
        if record is not None:
            record.open = False
        return record

    def close(self) -> None:
        self.closed = True
        self._drop()

    def _drop(self) -> None:
        if self.current is not None:
            self.current.open = False
        self.current = None


class _Contested(NamedTuple):
    """A key registered twice while live: no milter for it until ``state`` (the first) goes."""

    state: SessionState


class Sessions:
    """The process-wide registry; see the module docstring."""

    def __init__(self, clock: Clock, max_sessions: int = 1000, ttl_seconds: float = 3600.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._entries: ExpiringCache[SessionKey, SessionState | _Contested] = ExpiringCache(
            max_sessions, clock)

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, connection) -> SessionState | None:
        """A new milter connection; None if its address and port are unknown."""
        key = milter_key(connection)
        if key is None:
            return None
        live = self._entries.get(key)
        if live is not None:
            # Never replace a live entry: any local user who can reach the milter socket
            # could otherwise claim a real SMTP session's address and port and turn its SPF
            # failure into DUNNO. Which of the two is Postfix cannot be told, so the key
            # means "no milter" for both (SPF decides at RCPT) until the first one closes.
            # (A close is never missed: the adapter removes its entry on connection loss.)
            first = live.state if isinstance(live, _Contested) else live
            self._entries.put(key, _Contested(first), self.ttl_seconds)
            return None
        state = SessionState(key)
        self._entries.put(key, state, self.ttl_seconds)
        return state

    def touch(self, state: SessionState) -> None:
        """Keep a live session's entry from expiring (called at each message)."""
        if not state.closed and self._entries.get(state.key) is state:
            self._entries.put(state.key, state, self.ttl_seconds)

    def remove(self, state: SessionState) -> None:
        """The milter connection closed: its entry (if still its own) goes."""
        state.close()
        entry = self._entries.get(state.key)
        if entry is state or (isinstance(entry, _Contested) and entry.state is state):
            self._entries.pop(state.key)

    def find(self, attributes: Mapping[str, str]) -> SessionState | None:
        """The milter session of the SMTP connection a policy request is about, or None."""
        key = policy_key(attributes)
        if key is None:
            return None
        state = self._entries.get(key)
        if state is None and key.server is not None:
            state = self._entries.get(key.without_server())  # the milter lacks {daemon_*}
        return None if isinstance(state, _Contested) else state

    def message_for(self, attributes: Mapping[str, str]) -> MessageRecord | None:
        """The open message a policy request is about, if the milter will decide it."""
        state = self.find(attributes)
        record = None if state is None else state.current
        if record is None or not record.open:
            return None
        if not same_sender(record.sender, attributes.get("sender", "")):
            return None  # not the message the milter is collecting: enforce at RCPT
        return record

    def milter_in_path(self, attributes: Mapping[str, str]) -> bool:
        """Whether a milter will decide this request's message at end of message."""
        return self.message_for(attributes) is not None
