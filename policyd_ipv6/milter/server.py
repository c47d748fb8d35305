"""The Twisted adapter of the built-in milter: Postfix's milter connection in, verdicts out.

Contract: ``MilterFactory(engine, lookups, clock, authserv_id, ...)`` builds one
``MilterProtocol`` per milter connection (Postfix opens one per SMTP session). Parsing and
protocol state are ``milter_session``'s; the end-of-message rules are ``end_of_message``'s;
DKIM is ``dkim_check``'s; this module moves bytes, keeps time and ties the SMTP session to
the policy side through ``engine.sessions`` (``sessions``).

What it does (the milter stays on every connection, answering only at end of message: the
other stages are negotiated no-reply, SMFIP_NR_*, see ``milter.session``):
- CONNECT: an IPv6 client outside ``trusted_networks`` whose address and port are known is
  registered, so the policy side knows a milter is on its session. IPv4, trusted and
  unknown clients are not registered, but their messages still lose forged headers.
- MAIL FROM: for a registered session, a message is opened for the policy to record on,
  unless the client is SASL-authenticated ({auth_authen}: the policy says DUNNO for it).
  The sender is compared in Postfix's internal form (``MailFrom.address``).
- Body: kept only when end of message will read it, that is when the message's record is
  concerned (``end_of_message.needs_check``) at its first body byte. Every policy answer
  Postfix waits for came before: RCPT precedes DATA, and the content reaches the milter
  only once queued. A record not concerned then is closed (``end_message``), so that an
  answer Postfix no longer waits for cannot make it need the body it did not keep. A body
  over ``dkim.MAX_BODY_BYTES`` keeps only the bytes showing it is too large to verify.
- End of message: what ``end_of_message`` decides, after ``check_dkim`` when the message is
  concerned; incoming Authentication-Results claiming ``authserv_id`` (marked by the
  session as they arrive, ``authres.forged_authres``) are deleted from every message.
  Large messages are verified by ``dkim_pool``'s worker processes (``check_dkim``).
- authserv_id reloads: our header carries the id in force at end of message; a header is
  marked when it claims that id at its arrival or the id the connection started with (both
  are deleted). A reload between a message's headers and its end leaves headers unchecked
  against the new id: the forged list is then incomplete, TEMPFAIL (``forged-incomplete``).
- ABORT (RSET) closes the open message; QUIT or a lost connection removes the session.

Failure contract: a protocol error (bytes Postfix would not send) is logged and the connection
dropped without a reply; Postfix applies ``milter_default_action``. An internal error at end
of message answers TEMPFAIL (the sender retries: an error never lets unauthenticated mail or
a forged Authentication-Results in). A DKIM check not settled
``eom_deadline_seconds`` after end of message answers the configured ``temporary`` reply
(451 4.4.3, rule ``eom-deadline``), never accept; SMFIR_PROGRESS goes out every
``PROGRESS_INTERVAL_SECONDS`` meanwhile. Connections over ``max_connections``, ones from a
Unix-socket peer whose uid is not in ``peer_uids`` (``connection.PeerCheck``) and ones idle
for ``idle_timeout_seconds`` between transactions are closed; never one in a transaction
(MAIL to end of message or ABORT): Postfix sends nothing while the client uploads DATA
(cleanup sends the content only once the whole message is queued), and a close there would
make Postfix apply ``milter_default_action`` to the message.

The factory counts what it answered (read by the metrics): ``messages`` by end-of-message
rule, ``signatures`` by the result of each DKIM signature verified.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet import defer, protocol
from twisted.logger import Logger

from policyd_ipv6.checks.dkim import MAX_BODY_BYTES, check_dkim
from policyd_ipv6.connection import OverLimitWarning, PeerCheck, TimedConnection
from policyd_ipv6.facts import DkimFact
from policyd_ipv6.live import Live, Setting
from policyd_ipv6.milter import authres
from policyd_ipv6.milter.codec import Disposition, MilterProtocolError, ReplyCode
from policyd_ipv6.milter.end_of_message import EndDecision, decide_end, needs_check
from policyd_ipv6.milter.events import Aborted, Closed, Connected, EndOfMessage, MailFrom
from policyd_ipv6.milter.session import MilterSession
from policyd_ipv6.names import client_ip
from policyd_ipv6.text import printable
from policyd_ipv6.vocabulary import EndRule

__all__ = ["MilterFactory", "MilterProtocol", "PROGRESS_INTERVAL_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

# While DKIM is pending at end of message: each SMFIR_PROGRESS restarts Postfix's
# milter_content_timeout (300 s; milter8_event reads again after one), so Postfix waits for
# our own deadline instead of giving up first and applying milter_default_action.
PROGRESS_INTERVAL_SECONDS = 10.0


class MilterProtocol(TimedConnection, protocol.Protocol):
    def __init__(self, factory: MilterFactory) -> None:
        self.factory = factory
        self.first_id = factory.authserv_id  # the authserv_id when the connection came
        self.marked_ids: set[str] = set()  # the ids this message's headers were checked for
        self.session = MilterSession(mark_header=self._forged, wants_body=self._wants_body,
                                     max_body_kept=MAX_BODY_BYTES)
        self.state = None  # sessions.SessionState once registered
        self.client = "-"
        self.closed = False
        self.in_transaction = False  # MAIL seen, end of message or ABORT not yet answered
        self.waiting: object | None = None  # the end of message owed a verdict
        self.eom_timers: list = []  # its deadline and progress calls

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.open.add(self)
        if not self.factory.peer_check.admits(self.transport):
            self._close()
            return
        if self.factory.connections > self.factory.max_connections:
            # Postfix applies milter_default_action to this session; the policy side then
            # sees no milter on it and enforces SPF alone (the fail-safe).
            self.factory.over_limit.note(self.factory.max_connections, "closed the new one")
            self._close()
            return
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            received = self.session.receive(data)
        except MilterProtocolError as error:
            _log.warn("milter protocol error from {peer}, closing without a reply: {error}",
                      peer=self._peer(), error=printable(str(error), 200))
            self._close()
            return
        self.transport.write(received.reply)
        self._arm_timer()
        for event in received.events:
            if self.closed:
                return
            self._event(event)

    def _event(self, event) -> None:
        sessions = self.factory.engine.sessions
        if isinstance(event, Connected):
            self._connect(event.connection, sessions)
            if event.needs_verdict:
                self._answer(Disposition.CONTINUE)
        elif isinstance(event, MailFrom):
            self.in_transaction = True
            self.marked_ids = set()
            if self.state is not None and event.macros.get("auth_authen"):
                self.state.skip_message()
            elif self.state is not None:
                # The internal form: the policy request's sender is unquoted, the MAIL
                # argument is as written ('<"john smith"@example.net>').
                self.state.begin_message(event.address)
                sessions.touch(self.state)
            if event.needs_verdict:
                self._answer(Disposition.CONTINUE)
        elif isinstance(event, EndOfMessage):
            self._end_of_message(event)
        elif isinstance(event, Aborted):
            self.in_transaction = False
            if self.state is not None:
                self.state.end_message()
        elif isinstance(event, Closed):
            self.in_transaction = False
            self._unregister()
            if not event.new_connection:
                self._close()
        elif event.needs_verdict:  # a stage we did not ask for: never blocks Postfix
            self._answer(Disposition.CONTINUE)

    def _forged(self, name: bytes, value: bytes) -> bool:
        """The session's mark_header: an Authentication-Results claiming our authserv-id."""
        if not authres.is_authres(name):
            return False
        now = self.factory.authserv_id
        self.marked_ids.add(now)
        return authres.claims(value, now) or (now != self.first_id
                                              and authres.claims(value, self.first_id))

    def _wants_body(self) -> bool:
        """At the first body byte: whether end of message will read the body (docstring)."""
        record = self.state.current if self.state is not None else None
        if record is not None and record.open and record.concerned:
            return True
        if self.state is not None:
            self.state.end_message()
        return False

    def _connect(self, connection, sessions) -> None:
        # Never ACCEPT here: Postfix would drop the milter for the session, and forged
        # Authentication-Results must go from IPv4 and trusted clients' mail too.
        self._unregister()
        ip = client_ip(connection.address or "") if connection.family in ("4", "6") else None
        self.client = printable(connection.address or "-", 64)
        if ip is None or ip.version == 4 or self.factory.engine.policy.trusts(ip):
            return
        # Unregistered (None), the policy side enforces SPF alone for this session.
        self.state = sessions.register(connection)

    def _end_of_message(self, event: EndOfMessage) -> None:
        record = self.state.take_message() if self.state is not None else None
        message = event.message
        start = self.factory.clock.seconds()
        # Our header's id and the forgeries deleted: both of the id in force now.
        authserv_id, marked_ids, self.marked_ids = self.factory.authserv_id, self.marked_ids, set()
        forged = message.marked_deletions()
        if marked_ids - {authserv_id} and authserv_id != self.first_id:
            _log.warn("milter: authserv_id changed to {id} while a message from {client} "
                      "arrived; its headers were not all checked for it: answered TEMPFAIL",
                      id=authserv_id, client=self.client)
            forged = None
        token = self.waiting = object()
        d: defer.Deferred[DkimFact] | defer.Deferred[None]
        if needs_check(record, message.too_large) == "dkim":
            raw = message.raw()
            clock = self.factory.clock
            self.eom_timers = [
                clock.callLater(self.factory.eom_deadline_seconds, self._deadline, token,
                                record, message, start),
                clock.callLater(PROGRESS_INTERVAL_SECONDS, self._progress, token)]
            d = check_dkim(self.factory.lookups, raw, self.factory.dkim_pool)
        else:
            d = defer.succeed(None)
        d.addCallback(lambda dkim: (decide_end(
            record, message.too_large, dkim, self.factory.engine.policy.replies,
            authserv_id, forged), dkim))
        d.addCallback(self._send_end, token, message, start)
        d.addErrback(self._end_failed, token, record)

    def _settle(self, token) -> bool:
        """True (once) if ``token`` is the end of message still owed a verdict."""
        if token is not self.waiting:
            return False  # answered already (the deadline came first), or connection gone
        self.waiting = None
        self.in_transaction = False
        for call in self.eom_timers:
            if call.active():
                call.cancel()
        self.eom_timers = []
        return True

    def _progress(self, token) -> None:
        if token is self.waiting and not self.closed:
            self.transport.write(self.session.send_progress())
            self.eom_timers.append(self.factory.clock.callLater(
                PROGRESS_INTERVAL_SECONDS, self._progress, token))

    def _deadline(self, token, record, message, start: float) -> None:
        # A temporary refusal, whatever the message: DKIM decides a message that failed SPF,
        # and even one that passed would go out without our verdict on its headers (forged
        # Authentication-Results kept). The sender retries; a slow check never lets mail in.
        subject, _ = record.evidence()
        address = (str(subject.ip) if subject.ip is not None
                   else printable(subject.client_address, 64))
        text = self.factory.engine.policy.replies.temporary.format(address=address,
                                                                   check="DKIM")
        _log.warn("milter: DKIM not settled {s}s after end of message from {client}; "
                  "answered 451", s=self.factory.eom_deadline_seconds, client=self.client)
        self._send_end((EndDecision(ReplyCode(text), rule=EndRule.EOM_DEADLINE), None), token,
                       message, start)

    def _send_end(self, decided, token, message, start: float) -> None:
        if not self._settle(token):
            return
        decision, dkim = decided
        self.factory.messages[decision.rule] += 1
        for signature in dkim.signatures if dkim else ():
            self.factory.signatures[signature.result] += 1
        if not self.closed:
            self.transport.write(self.session.send_verdict(decision.response, decision.edits))
        response = getattr(decision.response, "text", None) or decision.response.name
        # Report mode: would= is the refusal that was only reported (end_of_message).
        would = f' would="{printable(decision.would, 300)}"' if decision.would else ""
        which = self.factory.engine.log_decisions  # the key log_decisions
        refused = bool(decision.would) or response[:1] in ("4", "5", "T", "R")  # TEMPFAIL, REJECT
        if (which == "all" or (which == "ipv6" and ":" in self.client)
                or (which == "refusals" and refused)):
            # dkim= quoted: a signature's d= and s= are the sender's text, spaces and "="
            # included, and must not read as fields of their own (report.lines).
            _log.info('milter client={client} sender="{sender}" queue_id={queue_id} '
                      'size={size} dkim="{dkim}" rule={rule}{would} reply="{reply}" ms={ms:.1f}',
                      client=self.client, sender=printable(message.sender or "", 200),
                      queue_id=printable(message.macros.get("i", ""), 20) or "-",
                      size=message.body_size,
                      dkim=printable(dkim.describe(), 250) if dkim else "-",
                      rule=decision.rule, would=would, reply=printable(response, 300),
                      ms=(self.factory.clock.seconds() - start) * 1000)
        if decision.rule.startswith("too-large"):
            _log.warn("milter: message from {client} too large to check ({rule})",
                      client=self.client, rule=decision.rule)

    def _end_failed(self, failure, token, record) -> None:
        _log.failure("internal error at end of message", failure)
        if self._settle(token) and not self.closed and self.session.pending is not None:
            # TEMPFAIL whatever the message: even one that needed no DKIM would keep its
            # forged Authentication-Results if accepted without our edits.
            self.transport.write(self.session.send_verdict(Disposition.TEMPFAIL))

    def _answer(self, verdict: Disposition) -> None:
        self.transport.write(self.session.send_verdict(verdict))

    def _unregister(self) -> None:
        if self.state is not None:
            self.factory.engine.sessions.remove(self.state)
            self.state = None

    def _timed_out(self) -> None:
        # Waiting for our own verdict, or in a transaction: Postfix is silent while the client
        # uploads DATA (each pause under smtpd_timeout), and closing then would hand the
        # message to milter_default_action. Postfix's own timeouts end a dead session.
        if self.session.pending is not None or self.in_transaction:
            self._arm_timer()
            return
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._unregister()
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self._settle(self.waiting)
        self._unregister()
        self.factory.connections -= 1
        self.factory.open.discard(self)
        self._stop_timer()


class MilterFactory(protocol.Factory):
    """``engine`` gives the live policy (trusted networks, replies) and ``sessions``."""

    noisy = False

    # Reloadable: read from the configuration in force once the wiring sets ``live``.
    authserv_id = Setting("authserv_id", derived=True)
    idle_timeout_seconds = Setting("idle_timeout_seconds")
    eom_deadline_seconds = Setting("milter_eom_deadline_seconds")
    live: Live | None = None

    def __init__(self, engine, lookups, clock, authserv_id: str, max_connections: int = 1000,
                 idle_timeout_seconds: float = 600.0, dkim_pool=None,
                 eom_deadline_seconds: float = 60.0,
                 peer_uids: frozenset[int] | None = None) -> None:
        if engine.sessions is None:
            raise ValueError("the milter needs an engine with a sessions registry")
        self.engine = engine
        self.lookups = lookups
        self.clock = clock
        self.authserv_id = authserv_id
        self.max_connections = max_connections
        self.idle_timeout_seconds = idle_timeout_seconds
        # Well under Postfix's milter_content_timeout (300 s): our 451 must reach the client
        # before Postfix gives up on us and applies milter_default_action.
        self.eom_deadline_seconds = eom_deadline_seconds
        self.peer_check = PeerCheck(clock, "milter", peer_uids)
        self.connections = 0
        self.open: set[MilterProtocol] = set()  # for a graceful stop (daemon.stopping)
        self.over_limit = OverLimitWarning(clock, "milter")
        # A started dkim_pool.DkimPool for large messages; None verifies everything inline.
        self.dkim_pool = dkim_pool
        self.messages: Counter[str] = Counter()  # verdicts by end-of-message rule
        self.signatures: Counter[str] = Counter()  # DKIM signatures by result

    def buildProtocol(self, addr) -> MilterProtocol:
        return MilterProtocol(self)
