"""The terminal of a skinsynth command: its own progress on the terminal, Ray's log lines in the run's log files.

A command that runs stages (``demo``, ``run``, ``data prepare``, ``train``, ...) does its work inside
:func:`quiet_terminal`. From then on:

* skinsynth's own lines - ``print`` and the ``progress`` callbacks, which write to ``sys.stdout`` - reach the terminal;
* everything else written to the process's file descriptors 1 and 2 - Ray's C++ core (``core_worker.cc`` lines), its
  Python loggers (the token-authentication warning, Ray Data's ``streaming_executor`` and ``logging_progress``
  blocks), Python warnings - goes through a pipe into ``RUN_DIR/logs/<stage>.log``, the stage named by
  :meth:`Console.stage` (``RUN_DIR/logs/command.log`` before the first);
* the lines Ray forwards from its workers and actors ("``(RayTrainWorker pid=...)``") go to the same file, except
  those a worker wrote with :func:`worker_progress`: those are progress, and reach the terminal.

On a terminal, progress is a tqdm bar per counted piece of work (:meth:`Console.counter`); elsewhere (CI, a log
file) it is a plain line every ``PLAIN_EVERY_S`` seconds and at the end, with the count and the rate. ``--verbose``
copies the log lines to the terminal as well.

Ray's worker lines arrive through ``ray._private.ray_logging.global_worker_stdstream_dispatcher``, whose handler
``ray.init`` installs, and the raylet's messages through ``ray._private.worker.print_to_stdstream``;
:func:`attach_ray` points both at the console while one is active (and back after). Both are Ray internals, so a
Ray upgrade that renames them leaves those lines on the terminal, nothing worse.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from skinsynth.core.rundir import LOGS_FOLDER  # RUN_DIR/logs/<stage>.log

COMMAND_LOG = "command"  # the log's name before any stage has started
# a line a Ray worker prints with this prefix is progress for the terminal, not a log line
WORKER_PROGRESS_MARK = "[skinsynth-progress] "
PLAIN_EVERY_S = 10.0  # plain progress lines (no terminal) at most this often
_RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its worker-log handler

_active: Console | None = None


def worker_progress(text: str, done: int | None = None, total: int | None = None, unit: str = "") -> None:
    """Progress from inside a Ray worker (a training loop): the command's terminal shows it as a bar when it has a
    count, else as the line ``text``. Without a console (a test calling the stage, a sweep trial's own driver) it
    stays a worker line, mark included, in Ray's usual output.

    Args:
        text: the line (``"train: epoch 2/3  loss 1.76 ..."``).
        done: units done so far; with ``total``, drives the bar.
        total: units in all.
        unit: what is counted (``"epochs"``, ``"steps"``).
    """
    count = f"{done}/{total}/{unit}" if done is not None and total is not None else "-"
    print(f"{WORKER_PROGRESS_MARK}{count} {text}", flush=True)


def _parse_worker_progress(line: str) -> tuple[str, int | None, int | None, str] | None:
    """``(text, done, total, unit)`` of a :func:`worker_progress` line, or None for any other line."""
    at = line.find(WORKER_PROGRESS_MARK)
    if at < 0:
        return None
    count, _, text = line[at + len(WORKER_PROGRESS_MARK) :].partition(" ")
    if count == "-":
        return text, None, None, ""
    try:
        done, total, unit = count.split("/", 2)
        return text, int(done), int(total), unit
    except ValueError:
        return line[at + len(WORKER_PROGRESS_MARK) :], None, None, ""


class Counter:
    """Progress of one counted piece of work: a tqdm bar on a terminal, plain periodic lines elsewhere."""

    def __init__(self, console: Console, label: str, total: int | None, unit: str, initial: int = 0) -> None:
        self._console = console
        self.label = label
        self.total = total
        self.unit = unit
        self.done = initial  # already done when counting starts (a resumed run): not part of the rate
        self._initial = initial
        self._start = time.perf_counter()
        self._last_line = self._start
        self._bar = None
        if console.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=label, unit=f" {unit}", file=console.terminal, leave=True
            )

    def update(self, n: int = 1, *, done: int | None = None, text: str | None = None) -> None:
        """Count ``n`` more units (or set the count to ``done``); ``text`` is the latest detail line."""
        previous = self.done
        self.done = done if done is not None else self.done + n
        if self._bar is not None:
            self._bar.update(self.done - previous)
            if text:
                self._bar.set_postfix_str(text.removeprefix(f"{self.label}: "), refresh=True)
            return
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if finished or now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            self._console.say(text or self.line())

    def line(self) -> str:
        rate = (self.done - self._initial) / max(time.perf_counter() - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.label}: {self.done}{of} {self.unit} ({rate:.3g} {self.unit}/s)"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Console:
    """Where a command's output goes: see the module docstring."""

    def __init__(
        self, terminal: TextIO, *, errors: TextIO | None = None, verbose: bool = False, log_dir: Path | None = None
    ) -> None:
        self.terminal = terminal
        self.errors = errors or terminal
        self.verbose = verbose
        self.interactive = bool(getattr(terminal, "isatty", lambda: False)())
        self._lock = threading.RLock()
        self._log: TextIO | None = None
        self.log_path: Path | None = None
        self.stage_name: str | None = None
        self._log_dir = log_dir
        self._counters: dict[str, Counter] = {}
        self._pending: list[str] = []  # log text written before a run directory was known
        self._closed = False
        self.failed_log: Path | None = None  # the log of the stage an error left

    # --- the log file ---

    def set_run_dir(self, run_dir: str | Path) -> None:
        """Logs go to ``run_dir/logs/`` from now on (the command log until a stage starts)."""
        log_dir = Path(run_dir) / LOGS_FOLDER
        if log_dir != self._log_dir:
            self._log_dir = log_dir
            self._open(self.stage_name or COMMAND_LOG)

    @contextmanager
    def stage(self, name: str) -> Iterator[Path | None]:
        """Log lines go to ``RUN_DIR/logs/<name>.log`` inside this block; yields that path (None: no run dir)."""
        previous = self.stage_name
        self._open(name)
        try:
            yield self.log_path
        except BaseException:
            self.failed_log = self.failed_log or self.log_path
            raise
        finally:
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()
            self._open(previous or COMMAND_LOG)

    def _open(self, name: str) -> None:
        with self._lock:
            self.stage_name = name if name != COMMAND_LOG else None
            if self._log_dir is None:
                return
            if self._log is not None:
                self._log.close()
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self._log_dir / f"{name}.log"
            self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (kept open)
            if self._pending:
                self._log.write("".join(self._pending))
                self._pending.clear()
            self._log.flush()

    def write_log(self, text: str) -> None:
        """Append raw text to the current log (and, with ``--verbose``, to the terminal)."""
        with self._lock:
            if self._closed:
                return  # Ray's processes outlive the command's console; what they write after it is dropped
            if self._log is not None:
                self._log.write(text)
                self._log.flush()
            else:
                self._pending.append(text)
        if self.verbose:
            self.say(text.rstrip("\n"), to_log=False)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()
            if self._log is not None:
                self._log.close()
                self._log = None

    # --- the terminal ---

    def say(self, message: str, *, to_log: bool = True) -> None:
        """One or more lines for the terminal (above any progress bar); also copied into the log."""
        with self._lock:
            if self.interactive and self._counters:
                from tqdm import tqdm

                tqdm.write(message, file=self.terminal)
            else:
                self.terminal.write(message + "\n")
                self.terminal.flush()
            if to_log and self._log is not None:
                self._log.write(message + "\n")
                self._log.flush()

    def error(self, message: str, *, with_log: bool = True) -> None:
        """An error for the terminal's error stream, with (``with_log``) the path of the log that holds the whole
        story: a failure in a stage's code or a Ray worker. An error the user can fix (a bad setting, a missing
        folder) says all there is to say in its one line."""
        log = self.failed_log or self.log_path
        with self._lock:
            for counter in self._counters.values():
                counter.close()
            self._counters.clear()
            if self._log is not None:
                self._log.write(message + "\n")
                self._log.flush()
        hint = f"\nfull log: {log}" if with_log and log is not None else ""
        self.errors.write(f"{message}{hint}\n")
        self.errors.flush()

    def counter(self, label: str, total: int | None, unit: str, initial: int = 0) -> Counter:
        """A progress counter (bar or plain lines) for ``label``, closed when the current stage ends; ``initial``
        units count as done before it started."""
        with self._lock:
            counter = self._counters.get(label)
            if counter is None or counter.total != total:
                if counter is not None:
                    counter.close()
                counter = self._counters[label] = Counter(self, label, total, unit, initial)
            return counter

    def worker_line(self, line: str, source: str) -> None:
        """A line a Ray worker printed: progress to the terminal, the rest to the log."""
        parsed = _parse_worker_progress(line)
        if parsed is None:
            self.write_log(f"({source}) {line}\n")
            return
        text, done, total, unit = parsed
        if done is None or total is None:
            self.say(text)
            return
        label = text.split(":", 1)[0] if ":" in text else (self.stage_name or "progress")
        with self._lock:
            counter = self._counters.get(label)
            if counter is None or counter.total != total or done < counter.done:
                # a worker's first report (or a new trial's) starts a counter there: the time before it (start-up,
                # the first steps) is no rate
                if counter is not None:
                    counter.close()
                counter = self._counters[label] = Counter(self, label, total, unit, initial=done)
        if not self.interactive:
            # the worker already paces its lines (log_every): each is worth showing
            counter.done = done
            self.say(text)
        else:
            counter.update(done=done, text=text)


def active_console() -> Console | None:
    """The console of the running command, if it has one."""
    return _active


def say(message: str) -> None:
    """A line for the terminal: through the active console, else ``print``."""
    if _active is not None:
        _active.say(message)
    else:
        print(message, flush=True)


@contextmanager
def stage_log(name: str) -> Iterator[Path | None]:
    """``Console.stage`` of the active console; a no-op (yielding None) without one."""
    if _active is None:
        yield None
        return
    with _active.stage(name) as path:
        yield path


class _TerminalWriter(io.TextIOBase):
    """``sys.stdout`` under a console: the terminal, written above the progress bars (tqdm clears and redraws them)
    rather than through them."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._console.interactive

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._console.terminal, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        terminal = self._console.terminal
        if self._console.interactive and self._console._counters:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=terminal):
                terminal.write(text)
                terminal.flush()
        else:
            terminal.write(text)
        return len(text)

    def flush(self) -> None:
        self._console.terminal.flush()


class _LogWriter(io.TextIOBase):
    """A text stream into the console's current log."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._console.write_log(text)
        return len(text)


@contextmanager
def stdout_to_log() -> Iterator[None]:
    """``print`` inside this block goes to the log, not the terminal: for a library that prints its own status
    (Ray Tune's experiment box, trial tables and TensorBoard hint). No-op without an active console."""
    if _active is None:
        yield
        return
    from contextlib import redirect_stdout

    with redirect_stdout(_LogWriter(_active)):
        yield


def set_run_dir(run_dir: str | Path) -> None:
    """``Console.set_run_dir`` of the active console, if any."""
    if _active is not None:
        _active.set_run_dir(run_dir)


def counter(label: str, total: int | None, unit: str) -> Counter | None:
    """A progress counter of the active console (None without one: callers print their own lines)."""
    return _active.counter(label, total, unit) if _active is not None else None


# --- Ray ---


def _ray_dispatcher():
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:  # a Ray without it: its lines stay on the terminal
        return None
    return global_worker_stdstream_dispatcher


_ray_saved_handlers: list | None = None
_ray_saved_print = None


def attach_ray() -> None:
    """Route the worker lines Ray forwards to the driver through the active console (call after ``ray.init``)."""
    global _ray_saved_handlers
    dispatcher = _ray_dispatcher()
    if _active is None or dispatcher is None:
        return
    with dispatcher._lock:
        if _ray_saved_handlers is None:
            _ray_saved_handlers = [pair for pair in dispatcher.handlers if pair[0] == _RAY_HANDLER]
        dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != _RAY_HANDLER]
        dispatcher.handlers.append((_RAY_HANDLER, _console_ray_handler))
    # the raylet's messages ("N worker processes have been started ...") skip the dispatcher: Ray's error listener
    # calls the module's print_to_stdstream directly
    import ray._private.worker as ray_worker

    global _ray_saved_print
    if _ray_saved_print is None:
        _ray_saved_print = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: _console_ray_handler(data)


def _detach_ray() -> None:
    global _ray_saved_handlers
    dispatcher = _ray_dispatcher()
    if dispatcher is None or _ray_saved_handlers is None:
        return
    with dispatcher._lock:
        dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != _RAY_HANDLER]
        dispatcher.handlers.extend(_ray_saved_handlers)
    _ray_saved_handlers = None
    global _ray_saved_print
    if _ray_saved_print is not None:
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = _ray_saved_print
        _ray_saved_print = None


def _console_ray_handler(data: dict) -> None:
    console = _active
    if console is None:
        return
    pid = data.get("pid")
    lines = data.get("lines", [])
    if pid == "autoscaler":  # its status table every few seconds; only its events are worth a log line
        lines = [line for line in lines if ":event_summary:" in line]
    name = data.get("actor_name") or data.get("task_name") or ""
    source = f"{name} pid={pid}".strip()
    for line in lines:
        console.worker_line(line, source)


# --- the process's file descriptors ---


def _own_stream(stream: TextIO, fd: int) -> TextIO:
    """A stream that keeps reaching where ``stream`` reaches after fd ``fd`` is redirected: a new stream on a copy
    of the fd when ``stream`` writes to it, else ``stream`` itself (pytest's capture, a StringIO)."""
    try:
        writes_to_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        writes_to_fd = False
    if not writes_to_fd:
        return stream
    stream.flush()
    copy = os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8")
    return copy


def _pump(read_fd: int, console: Console) -> None:
    """Copy what Ray and the libraries write to fds 1 and 2 into the current log, line by line."""
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace", closefd=True) as pipe:
        for line in pipe:
            current = _active or console
            current.write_log(line)


# loggers whose console handlers write to the log under a console: their handlers hold the stream that was
# sys.stderr when the library was imported, which is fd 2 in a command (the pipe catches it) but need not be (a
# command run in-process under a test's capture, a notebook)
_LIBRARY_LOGGERS = ("ray", "optuna")


def _route_library_loggers(stream: io.TextIOBase) -> list[tuple[logging.StreamHandler, object]]:
    """Point the stream handlers of Ray's and Optuna's loggers at ``stream``; returns what to restore."""
    rerouted: list[tuple[logging.StreamHandler, object]] = []
    seen: set[int] = set()  # a handler shared by several loggers is pointed (and restored) once
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] not in _LIBRARY_LOGGERS:
            continue
        for handler in logger.handlers:
            if id(handler) in seen or type(handler).__module__.startswith("_pytest"):
                continue  # pytest's own capture handlers (copied onto a library's logger) keep their streams
            seen.add(id(handler))
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                # not setStream: it flushes the old stream, which may be long closed (a finished test's capture)
                with handler.lock or contextlib.nullcontext():
                    rerouted.append((handler, handler.stream))
                    handler.stream = stream
    return rerouted


@contextmanager
def quiet_terminal(*, verbose: bool = False) -> Iterator[Console]:
    """Run a command with skinsynth's lines on the terminal and everything else in the run's log files.

    The pipe stays open for the life of the process: Ray's processes started inside the block inherit it as their
    stdout and stderr, and a closed pipe would kill them on their next write.
    """
    global _active
    if _active is not None:  # nested (a command calling another): one console
        yield _active
        return
    terminal = _own_stream(sys.stdout, 1)
    errors = _own_stream(sys.stderr, 2)
    console = Console(terminal, errors=errors, verbose=verbose)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = (os.dup(1), os.dup(2))
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    threading.Thread(target=_pump, args=(read_fd, console), name="skinsynth-log-pump", daemon=True).start()
    saved_stdout = sys.stdout
    sys.stdout = _TerminalWriter(console)  # print() and progress callbacks: the terminal, above any progress bar
    logging.captureWarnings(True)  # warnings go through logging to stderr, i.e. the log
    saved_filters = warnings.filters[:]
    _active = console
    saved_stderr = sys.stderr
    rerouted: list = []
    try:
        # Python-level stderr too: a logging handler made during the command (Ray Data's, on its first dataset)
        # binds the sys.stderr of that moment; one made before (Ray's own, at import) is pointed at the log here
        sys.stderr = _LogWriter(console)
        rerouted = _route_library_loggers(sys.stderr)
        attach_ray()  # when Ray is already up (a session's Ray); ensure_ray attaches one it starts
        yield console
    finally:
        for handler, stream in rerouted:
            handler.stream = stream
        sys.stderr = saved_stderr
        _detach_ray()
        _active = None
        warnings.filters[:] = saved_filters
        logging.captureWarnings(False)
        sys.stdout = saved_stdout
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        console.close()
        terminal.flush()
        errors.flush()
