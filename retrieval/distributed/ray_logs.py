"""Ray's own output goes to a log file; the terminal keeps the run's progress bar and summary.

A Ray run otherwise prints what a local run does not: the driver's Python loggers (``Started a
local Ray instance``, Ray Data's ``streaming_executor.py ... execution finished``, its progress
lines or bars) and the driver's C++ core worker, which writes its ERROR lines straight to file
descriptor 2 (``core_worker.cc: ... constructor arguments in the object store``, printed for
every restartable Ray Data actor: ray-project/ray#53727). :func:`ray_logs_to` sends all of it to
one file in Ray's session folder, beside Ray's own logs, for the length of a run:

- the ``ray`` and ``ray.data`` loggers' console handlers are swapped for that file (their file
  handlers stay), and Ray Data's progress bars are off (the caller draws its own);
- Python warnings raised meanwhile (Ray's deprecations) are written to the file, and so is what
  Ray prints to ``sys.stdout`` (its error notices: a node's death with its raylet's last lines),
  where the command's results go;
- while the pipeline runs (:meth:`RayLogs.relay_stderr`), descriptor 2 is a pipe: lines in Ray's
  C++ log format go to the file, everything else (the progress bar, our own warnings) on to the
  terminal unchanged. It is set up after the cluster is joined, so no Ray daemon inherits it.

Everything is put back on leaving; nothing stays changed for the process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

RAY_LOGGERS = ("ray", "ray.data")
# The prefix of a line from Ray's C++ logging (spdlog): "[2026-12-07 08:14:42,403 E 123 456] ".
_CPP_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEC] \d+ \d+\]")
_CPP_TEMPLATE = b"[0000-00-00 00:00:00,000 "  # 0 stands for any digit
_FORMAT = "%(asctime)s\t%(levelname)s %(name)s -- %(message)s"


class RayLogs:
    """Where this run's Ray output goes; ``path`` is known once the cluster is joined."""

    def __init__(self) -> None:
        self.path: Path | None = None
        # Records logged before the session folder exists (ray.init's own) wait here.
        self._early = logging.handlers.MemoryHandler(
            capacity=10_000, flushLevel=logging.CRITICAL + 1
        )
        self._early.setLevel(logging.INFO)
        self._file: logging.FileHandler | None = None
        self._pending: list[str] = []

    @property
    def handler(self) -> logging.Handler:
        return self._file or self._early

    def open_file(self) -> Path:
        """Open the log file in Ray's session folder (after ``ray.init``) and write the records
        kept so far into it; says where it is with one INFO line (``retrieve -v`` shows it)."""
        if self._file is not None:
            return self.path
        self.path = _session_logs() / f"retrieve-driver-{os.getpid()}.log"
        self._file = logging.FileHandler(self.path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(_FORMAT))
        self._file.setLevel(logging.INFO)
        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            if self._early in logger.handlers:
                logger.removeHandler(self._early)
                logger.addHandler(self._file)
        self._early.setTarget(self._file)
        self._early.flush()
        self._early.close()
        self.raw("".join(self._pending))
        log.info("Ray's own logs: %s", self.path)
        return self.path

    def warning(self, text: str) -> None:
        """A Python warning raised during the run, as a record of the log."""
        record = logging.makeLogRecord(
            {"name": "py.warnings", "levelno": logging.WARNING, "levelname": "WARNING", "msg": text}
        )
        self.handler.handle(record)

    def raw(self, text: str) -> None:
        """What Ray wrote itself (formatted already), as it is; kept until the file opens."""
        if self._file is None:
            self._pending.append(text)
            return
        self._file.acquire()
        try:
            self._file.stream.write(text)
            self._file.stream.flush()
        finally:
            self._file.release()

    @contextlib.contextmanager
    def relay_stderr(self) -> Iterator[None]:
        """Descriptor 2 through a relay while the block runs: Ray's C++ log lines to the file,
        the rest to the terminal as it comes (a progress bar's partial lines included). On a
        terminal the relay is a pseudo-terminal of the same size, so what asks (a progress bar
        sizing itself) still finds one."""
        import sys

        if self._file is None:
            yield
            return
        sys.stderr.flush()
        terminal = os.dup(2)
        read_end, write_end = _relay_ends(terminal)
        os.dup2(write_end, 2)
        os.close(write_end)
        relay = threading.Thread(
            target=_relay, args=(read_end, terminal, self.raw), daemon=True, name="ray-stderr"
        )
        relay.start()
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)  # the relay's last writer goes: it reads to the end
            relay.join(timeout=5)
            if not relay.is_alive():
                os.close(terminal)


def _relay_ends(terminal: int) -> tuple[int, int]:
    """(read, write) descriptors: a raw pseudo-terminal of the terminal's size, else a pipe."""
    if not os.isatty(terminal):
        return os.pipe()
    import fcntl
    import termios
    import tty

    read_end, write_end = os.openpty()
    tty.setraw(write_end)  # bytes as written: no newline translation, no echo
    size = fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8)
    fcntl.ioctl(write_end, termios.TIOCSWINSZ, size)
    return read_end, write_end


class _ToLog(io.TextIOBase):
    """``sys.stdout`` for the run: Ray prints its error notices there (a node's death, with the
    tail of its raylet's log), where the results of the command go."""

    def __init__(self, logs: RayLogs) -> None:
        self.logs = logs

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.logs.raw(text)
        return len(text)


def _session_logs() -> Path:
    """``logs/`` of the Ray session this process joined (Ray keeps it after the run); a
    temporary folder if Ray does not say (its layout is not public API)."""
    try:
        import ray._private.worker as worker

        folder = Path(worker.global_worker.node.get_logs_dir_path())
    except (AttributeError, ImportError):
        folder = Path(tempfile.mkdtemp(prefix="retrieve-ray-"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _could_start_cpp_line(data: bytes) -> bool:
    """Whether ``data`` (no newline yet) may be the start of a Ray C++ log line."""
    for got, want in zip(data, _CPP_TEMPLATE):
        if want == ord("0"):
            if not 48 <= got <= 57:
                return False
        elif got != want:
            return False
    return True


def _relay(read_end: int, terminal: int, to_file) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(read_end, 65536)
        except OSError:  # a pseudo-terminal whose last writer closed: its end
            chunk = b""
        if chunk:
            pending = _route(pending + chunk, terminal, to_file, final=False)
            continue
        _route(pending, terminal, to_file, final=True)
        os.close(read_end)
        return


def _route(data: bytes, terminal: int, to_file, final: bool) -> bytes:
    """Send whole C++ lines to the file and the rest to the terminal; returns what must wait
    for more bytes (a possible C++ line without its newline yet)."""
    while data:
        newline = data.find(b"\n")
        if _CPP_LINE.match(data):
            if newline < 0 and not final:
                return data
            end = len(data) if newline < 0 else newline + 1
            to_file(data[:end].decode("utf-8", "replace"))
            data = data[end:]
            continue
        if data[:1] == b"[" and newline < 0 and not final and _could_start_cpp_line(data):
            return data
        # Up to the end of this line, or to a "[" that may open a C++ line after a partial one
        # (a progress bar redraws its line without ending it).
        ends = [newline + 1] if newline >= 0 else []
        ends += [i for i in (data.find(b"[", 1),) if i > 0]
        cut = min(ends) if ends else len(data)
        _write_all(terminal, data[:cut])
        data = data[cut:]
    return b""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@contextlib.contextmanager
def ray_logs_to() -> Iterator[RayLogs]:
    """Ray's Python loggers, its warnings and Ray Data's progress bars away from the terminal
    for the block; call ``open_file`` once joined and ``relay_stderr`` around the run."""
    import ray.data  # configures its loggers on import: swap them after, not before

    logs = RayLogs()
    saved = []
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        consoles = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for handler in consoles:
            logger.removeHandler(handler)
        logger.addHandler(logs.handler)
        saved.append((logger, consoles))
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    with warnings.catch_warnings(), contextlib.redirect_stdout(_ToLog(logs)):
        warnings.showwarning = lambda message, category, filename, lineno, *_: logs.warning(
            warnings.formatwarning(message, category, filename, lineno).rstrip()
        )
        try:
            yield logs
        finally:
            context.enable_progress_bars = bars
            for logger, consoles in saved:
                for handler in (logs._early, logs._file):
                    if handler is not None and handler in logger.handlers:
                        logger.removeHandler(handler)
                for handler in consoles:
                    logger.addHandler(handler)
            if logs._file is not None:
                logs._file.close()
