"""A bounded pool of DKIM verification worker processes, driven from the reactor.

Contract: ``DkimPool(reactor, workers, queue_limit, deadline_seconds)``; ``start()`` spawns
the workers (``python3 -I`` running ``dkim_verify.main``) and stops them when the reactor
shuts down; ``submit(request, message)`` returns a Deferred that fires with the worker's
answer (the JSON value ``dkim_verify`` returns for ``request``) or fails with:

- ``PoolBusy``: ``queue_limit`` jobs already wait for a worker (the caller answers
  "temporary", 451 4.4.3: a burst of large signed messages is retried, never accepted);
- ``WorkerLost``: the job did not finish within ``deadline_seconds`` of its submission (a
  running job's worker is then killed), the worker died or answered garbage, or the pool is
  stopped. A lost worker is replaced at once (after a second if it died young, so a worker
  that cannot start does not spin).

Why processes: dkimpy's canonicalisation and hashing are Python code holding the GIL; on a
thread the reactor stalled about 1 s per 10 MB message. Each worker is a separate interpreter
fed through its standard input with ``dkim_verify``'s length-prefixed frames (the message's
bytes are written as they are, never copied into the frame), one job at a time, and it answers
one JSON frame on standard output. ``-I`` (isolated mode) keeps the worker from importing
anything from its working directory or the environment; the package's parent directory is
put first on its path explicitly.

Privileges: the workers parse hostile messages, so they never verify as root. Started by a
daemon that is still root (``start(become=(uid, gid, name))``, just before the daemon drops its
own privileges), a worker imports what it needs while it can still read it (a clone in /root,
mode 700, is readable only by root) and then drops to that user itself, before it reads any
job; a worker that cannot drop exits without serving. A worker the pool respawns later is
started by the unprivileged daemon and imports as that user: from a place that user cannot
read it dies at start-up, and its jobs get ``WorkerLost`` (a temporary refusal, never an
accept); the packaged install (/usr/share/policyd-ipv6) is readable by everyone.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from policyd_ipv6.checks.dkim_verify import decode_answer, encode_request
from policyd_ipv6.text import printable

__all__ = ["DkimPool", "PoolBusy", "WorkerLost", "WORKERS", "QUEUE_LIMIT", "DEADLINE_SECONDS"]

_log = Logger(namespace="policyd-ipv6")

# Fixed here rather than in the configuration: one or two workers use one or two cores of a
# small host, and the reactor keeps the rest. Each running job holds at most about three
# times dkim.MAX_BODY_BYTES (4 MiB) of memory.
WORKERS = max(1, min(2, (os.cpu_count() or 1) - 1 or 1))
# Jobs waiting for a worker. A job is at most five signatures over at most 4 MiB of body,
# under a second of CPU: eight waiting jobs are a few seconds of delay, well within Postfix's
# milter_content_timeout (300 s).
QUEUE_LIMIT = 8
# From submission to answer. A job that takes longer is hung or hostile: its worker is killed.
DEADLINE_SECONDS = 30.0
_YOUNG_SECONDS = 1.0  # a worker that dies younger than this is restarted after this delay
_STDERR_LINES = 20  # per worker, so a noisy worker cannot fill the log

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
         "from policyd_ipv6.checks.dkim_verify import main, become; "
         "become(sys.argv[1:]); sys.exit(main())")


class PoolBusy(Exception):
    """Every worker is busy and the queue is full."""


class WorkerLost(Exception):
    """The job's worker died, hung, or the pool stopped before it answered."""


class _Job:
    def __init__(self, request: dict, message: bytes) -> None:
        self.request = request
        self.message = message
        self.deferred: defer.Deferred = defer.Deferred()
        self.timer = None
        self.worker: _Worker | None = None

    def finish(self, result) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.message = b""
        if not self.deferred.called:
            if isinstance(result, Exception):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)


class _Worker(protocol.ProcessProtocol):
    # Typed Any: Twisted declares it as a zope.interface type, whose methods mypy cannot call
    # (they are declared without self).
    transport: Any

    def __init__(self, pool: DkimPool, started: float) -> None:
        self.pool = pool
        self.started = started
        self.buffer = bytearray()
        self.job: _Job | None = None
        self.lost = False
        self.stderr_lines = 0

    def run(self, job: _Job) -> None:
        self.job = job
        job.worker = self
        head = encode_request(job.request, len(job.message))
        self.transport.write(head)
        self.transport.write(job.message)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        try:
            answer = decode_answer(self.buffer)
        except ValueError as problem:
            self.kill(f"garbled answer ({problem})")
            return
        if answer is None:
            return
        job, self.job = self.job, None
        if job is None:
            self.kill("answer without a job")
            return
        if "ok" in answer:
            job.finish(answer["ok"])
        else:
            job.finish(WorkerLost(f"worker error: {printable(str(answer.get('error')), 200)}"))
        self.pool._idle(self)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if self.stderr_lines < _STDERR_LINES and line.strip():
                self.stderr_lines += 1
                _log.warn("dkim worker: {line}", line=printable(line, 200))

    def kill(self, why: str) -> None:
        """Fail the running job with ``why`` and end the process (it is replaced)."""
        if not self.lost:
            _log.warn("dkim worker {pid} killed: {why}", pid=self.transport.pid, why=why)
        self._lose(why)
        try:
            self.transport.signalProcess("KILL")
        except (error.ProcessExitedAlready, OSError):
            pass

    def outConnectionLost(self) -> None:
        # Its answer stream is gone: the worker is of no use, whether or not it was reaped.
        self._lose("worker exited")

    def processEnded(self, reason) -> None:
        self._lose(f"worker exited ({reason.value.__class__.__name__})")

    def _lose(self, why: str) -> None:
        job, self.job = self.job, None
        if job is not None:
            job.finish(WorkerLost(why))
        if not self.lost:
            self.lost = True
            self.pool._lost(self)


class DkimPool:
    def __init__(self, reactor, workers: int = WORKERS, queue_limit: int = QUEUE_LIMIT,
                 deadline_seconds: float = DEADLINE_SECONDS) -> None:
        if workers < 1 or queue_limit < 0 or deadline_seconds <= 0:
            raise ValueError("a DKIM pool needs a worker, a queue and a deadline")
        self.reactor = reactor
        self.size = workers
        self.queue_limit = queue_limit
        self.deadline_seconds = deadline_seconds
        self.workers: list[_Worker] = []
        self.idle: collections.deque[_Worker] = collections.deque()
        self.queue: collections.deque[_Job] = collections.deque()
        self.running = False
        self.restarts = 0
        self.become: tuple[int, int, str] | None = None

    def start(self, become: tuple[int, int, str] | None = None) -> None:
        """Spawn the workers; they are stopped before the reactor shuts down. ``become``:
        the (uid, gid, name) a worker started as root drops to once it has imported what it
        needs (see the module docstring)."""
        if self.running:
            return
        self.running = True
        self.become = become
        for _ in range(self.size):
            self._spawn()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def stop(self) -> None:
        """Fail every job with WorkerLost and end the workers (their standard input closes)."""
        self.running = False
        while self.queue:
            self.queue.popleft().finish(WorkerLost("the DKIM pool stopped"))
        for worker in list(self.workers):
            worker.lost = True
            worker._lose("the DKIM pool stopped")
            try:
                worker.transport.closeStdin()
                worker.transport.signalProcess("TERM")
            except (error.ProcessExitedAlready, OSError):
                pass
        self.workers.clear()
        self.idle.clear()

    def submit(self, request: dict, message: bytes) -> defer.Deferred:
        """See the module docstring."""
        if not self.running:
            return defer.fail(WorkerLost("the DKIM pool is not running"))
        if not self.idle and len(self.queue) >= self.queue_limit:
            return defer.fail(PoolBusy(f"{len(self.queue)} DKIM jobs already wait"))
        job = _Job(request, message)
        job.timer = self.reactor.callLater(self.deadline_seconds, self._overdue, job)
        self.queue.append(job)
        self._dispatch()
        return job.deferred

    def _overdue(self, job: _Job) -> None:
        job.timer = None
        if job.worker is not None and job.worker.job is job:
            job.worker.kill(f"no answer within {self.deadline_seconds:g} s")
        else:
            if job in self.queue:
                self.queue.remove(job)
            job.finish(WorkerLost(f"not started within {self.deadline_seconds:g} s"))

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            worker = self.idle.popleft()
            if worker.lost:
                continue
            worker.run(self.queue.popleft())

    def _idle(self, worker: _Worker) -> None:
        if not worker.lost:
            self.idle.append(worker)
            self._dispatch()

    def _spawn(self) -> None:
        if not self.running or len(self.workers) >= self.size:
            return
        worker = _Worker(self, self.reactor.seconds())
        become = [str(v) for v in self.become] if self.become is not None else []
        self.reactor.spawnProcess(worker, sys.executable,
                                  [sys.executable, "-I", "-c", _BOOT, *become],
                                  env={}, childFDs={0: "w", 1: "r", 2: "r"})
        self.workers.append(worker)
        self._idle(worker)

    def _lost(self, worker: _Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        if not self.running:
            return
        self.restarts += 1
        young = self.reactor.seconds() - worker.started < _YOUNG_SECONDS
        self.reactor.callLater(_YOUNG_SECONDS if young else 0, self._spawn)
