"""Servers on 127.0.0.1 for the serving tests: in a thread of the test process, or `mxc-serve` as a process of
its own, started as users start it."""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


class ServeProcess:
    """`python -m mindxcomposer.serve.cli --port P *args` in `cwd` with `env`, on a free port; entering waits
        until /health answers (or fails with the server's output), leaving terminates it and keeps what it printed
    in `output`."""

    def __init__(self, args, cwd, env=None, timeout=180):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args, self.cwd, self.env, self.timeout = list(args), cwd, env or dict(os.environ), timeout
        self.proc, self.output = None, ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import httpx

        # Its output goes to a file, not a pipe: nothing reads a pipe while the server runs, and a full one
        # (a release-size load prints progress bars) would stop the server.
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "mindxcomposer.serve.cli", "--port", str(self.port)]
                                     + self.args, cwd=self.cwd, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("mxc-serve exited: " + self._read_log())
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("mxc-serve did not come up")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.output = self._read_log()
        self.log.close()

    def _read_log(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()
