"""Warm child processes for the command line: `run` and `start` (a `Popen`) as in `subprocess`, for `python -m
emnist_cnn ARGS` and `python SCRIPT.py ARGS`, forked from a server that has already imported Keras and its
backend.

Why: each command's own process spends about 6.5 s of CPU importing TensorFlow, Keras and what they pull in
(JAX, scikit-learn and pandas in the test environment): half of a tiny test run. Importing starts nothing
(TensorFlow's runtime, thread pools and devices start at its first op), so a fork of a process that has only
imported them is the process a user would start, to the bit (tests/test_reproducible.py), a few seconds
sooner. The child runs the module or script as `python` does: its own argv, sys.path[0], cwd, environment,
stdio and Ctrl-C handler, exit status (or the signal that ended it), non-daemon threads and atexit handlers at
exit (tests/test_warmstart.py). What differs: the modules in PRELOAD are already imported, and the children
of one server share its seed for str hashes (a new process draws its own unless PYTHONHASHSEED is set).

What a process reads when it starts (`TF_*`, `XLA_*`, `KERAS_*`, `PYTHON*`, ...: START_UP_ENV) is the server's:
one server per such environment, started on first use, so a command with another backend or another start-up
setting gets a server started with it. Tests whose point is the start-up itself (the console on any CPU, what
is imported) start real processes; so do these functions for any other command line (`python -c`, a tool).

A server (`python warmstart.py --serve SOCKET`) forks one child per request, reaps it and sends its exit status
back; it exits when the test process closes its stdin, and kills the children it still has.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL
# Read when a process starts (by Python, TensorFlow, Keras, XLA, the CUDA runtime, the BLAS libraries): a
# command line asking for other values than the server's gets a real process.
START_UP_ENV = ("TF_", "XLA_", "KERAS_", "PYTHON", "LD_", "CUDA_", "NVIDIA_", "JAX_", "TORCH", "OMP_", "MKL_",
                "OPENBLAS_", "MALLOC_")
PRELOAD = ("emnist_cnn", "keras", "emnist_cnn.cli.main", "emnist_cnn.cli.commands",
           "emnist_cnn.training.train", "emnist_cnn.training.scaleout", "emnist_cnn.training.tracking",
           "emnist_cnn.engine.evaluate", "emnist_cnn.engine.export", "emnist_cnn.present.plots",
           "emnist_cnn.present.report")


# ----------------------------------------------------------------------------- the client (test process)


class _Server:
    """A warm server started with one start-up environment (its keys that START_UP_ENV names)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="warmstart-")
        self.path = os.path.join(self.folder, "socket")
        self.log = os.path.join(self.folder, "server.log")
        # -P: not this folder first on sys.path; each child puts its own there, as Python would.
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-P", __file__, "--serve", self.path], stdin=PIPE,
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)

    def connect(self, timeout: float = 120.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if self.proc.poll() is not None:
                    with open(self.log, errors="replace") as log:
                        tail = log.read()[-3000:]
                    raise RuntimeError(f"the warm-start server exited with {self.proc.returncode}:\n{tail}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("the warm-start server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_up_key(env: dict[str, str]) -> tuple:
    """What of `env` a process reads when it starts."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(START_UP_ENV)))


MAX_SERVERS = 3  # the most recently used; each holds its imports (about 0.5 GB)
_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def _get_server(env: dict[str, str]) -> _Server:
    key = start_up_key(env)
    with _servers_lock:
        server = _servers.pop(key, None)
        if server is None or server.proc.poll() is not None:
            if server is not None:
                server.stop()
            server = _Server(env)
        _servers[key] = server
        while len(_servers) > MAX_SERVERS:
            _servers.pop(next(iter(_servers))).stop()
        return server


def _served(argv: list[str]) -> bool:
    """`python -m emnist_cnn ...` or `python SCRIPT.py ...`."""
    return len(argv) >= 2 and argv[0] == sys.executable and (
        argv[1:3] == ["-m", "emnist_cnn"] or (not argv[1].startswith("-") and argv[1].endswith(".py")))


def _output_fds(spec, ours: int) -> tuple[int, int | None]:
    """(the fd the child writes to, our end of a pipe or None) for subprocess's stdout or stderr argument;
    None: this process's own fd `ours`, as subprocess would leave it."""
    if spec == PIPE:
        r, w = os.pipe()
        return w, r
    if spec == DEVNULL:
        return os.open(os.devnull, os.O_WRONLY), None
    return os.dup(ours if spec is None else spec if isinstance(spec, int) else spec.fileno()), None


class Popen:
    """`subprocess.Popen` for a warm child: args, pid, returncode, stdout, stderr, poll, wait, communicate,
    send_signal, terminate, kill (stdin is /dev/null; stdout and stderr: PIPE, DEVNULL, STDOUT for stderr, a
    file, or None for this process's own)."""

    def __init__(self, args, *, stdout=None, stderr=None, text: bool = False, env=None, cwd=None) -> None:
        self.args = [str(a) for a in args]
        self.returncode: int | None = None
        self._text = text
        env = dict(os.environ if env is None else env)
        self.server = server = _get_server(env)
        request = json.dumps({"argv": self.args[1:], "env": env, "cwd": str(cwd or os.getcwd())}).encode()
        self._sock = server.connect()
        self._received = b""  # the server's lines (the pid, then the exit status) may arrive in one read
        child_out, out = _output_fds(stdout, 1)
        child_err, err = (child_out, None) if stderr == subprocess.STDOUT else _output_fds(stderr, 2)
        child_in = os.open(os.devnull, os.O_RDONLY)
        try:
            socket.send_fds(self._sock, [struct.pack("!I", len(request)) + request],
                            [child_in, child_out, child_err])
            self.pid = self._read_message()["pid"]
        except BaseException:
            self._sock.close()
            for fd in (out, err):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in {child_in, child_out, child_err}:
                os.close(fd)
        self.stdout = os.fdopen(out, "r" if text else "rb") if out is not None else None
        self.stderr = os.fdopen(err, "r" if text else "rb") if err is not None else None

    def _read_message(self, timeout: float | None = None) -> dict:
        """The server's next line, as JSON."""
        self._sock.settimeout(timeout)
        while b"\n" not in self._received:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise RuntimeError("the warm-start server went away")
            self._received += chunk
        line, self._received = self._received.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None and (b"\n" in self._received or select.select([self._sock], [], [], 0)[0]):
            self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self._read_message(timeout)["returncode"]
            except (socket.timeout, TimeoutError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self._sock.close()
        return self.returncode

    def communicate(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = {f: [] for f in (self.stdout, self.stderr) if f is not None}
        open_files = list(chunks)
        while open_files:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(open_files, [], [], left)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for f in ready:
                data = os.read(f.fileno(), 1 << 16)
                if data:
                    chunks[f].append(data)
                else:
                    open_files.remove(f)
                    f.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

        def joined(f):
            if f is None:
                return None
            data = b"".join(chunks[f])
            return data.decode(errors="replace") if self._text else data

        return joined(self.stdout), joined(self.stderr)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _python_ctrl_c() -> None:
    """Ctrl-C as a Python started from a terminal handles it, also when the tests were started with SIGINT
    ignored (a background job of a non-interactive shell is, and an ignored SIGINT is inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, *, stdout=None, stderr=None, text: bool = False, env=None, cwd=None):
    """A warm `Popen` for `python -m emnist_cnn` and `python SCRIPT.py`, else `subprocess.Popen`; either way
    the child handles Ctrl-C as Python does (KeyboardInterrupt)."""
    args = [str(a) for a in args]
    if _served(args):
        return Popen(args, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd)
    return subprocess.Popen(args, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd,
                            preexec_fn=_python_ctrl_c)


def run(args, *, capture_output: bool = False, text: bool = False, timeout: float | None = None, env=None,
        cwd=None) -> subprocess.CompletedProcess:
    """`subprocess.run`, with a warm child where `start` gives one."""
    out = PIPE if capture_output else None
    proc = start(args, stdout=out, stderr=out, text=text, env=env, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ----------------------------------------------------------------------------- the server


def _run_child(request: dict, startup_env: dict[str, str]) -> None:
    """In the forked child: become `python ARGV` and exit as it would."""
    import random
    import runpy
    import traceback

    import numpy as np

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C handling
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in startup_env.items():  # what importing the package set with os.environ.setdefault
        os.environ.setdefault(key, value)
    random.seed()
    np.random.seed()
    argv = request["argv"]
    code = 0
    try:
        module = argv[0] == "-m"
        sys.argv = [argv[1], *argv[2:]] if module else list(argv)
        # Python's first entry: the folder for `-m`, the script's folder for a script.
        sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(argv[0])))
        if module:
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 (as the interpreter: the traceback, exit status 1)
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's exit: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:  # an uncaught Ctrl-C ends the process by SIGINT, as Python does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return json.loads(data), fds


def serve(path: str) -> None:
    import importlib

    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    startup_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the test run stops the tests, which stop us
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    children: dict[int, socket.socket] = {}
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            break
        if listener in ready:
            conn, _ = listener.accept()
            request, fds = _read_request(conn)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in children.values():
                    other.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                _run_child(request, startup_env)
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
