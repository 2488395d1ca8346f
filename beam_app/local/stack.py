"""The real Pub/Sub, BigQuery and Bigtable emulators on free loopback ports, for
the tests and the local demo: the streaming job and the online service run
unchanged against them, with no Google Cloud project, credentials or network.

- Pub/Sub: Google's emulator (a Google Cloud CLI component, Java), reached
  through PUBSUB_EMULATOR_HOST.
- Bigtable: Google's emulator (`cbtemulator`, a Google Cloud CLI component, Go),
  reached through BIGTABLE_EMULATOR_HOST; it keeps its tables in memory.
- BigQuery: `local-bigquery` (DuckDB-backed, answers insertAll with per-row
  errors like the real service), which needs Python >= 3.13 and so lives in
  its own venv: `make venv-bq` builds `.venv-bq` (docs/architecture.md, "Emulators").

    python -m beam_app.local.stack        # all three, until Ctrl-C; prints the exports
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from transforms.command_line import ArgumentParser

REPO = Path(__file__).resolve().parents[2]  # beam_app/local/stack.py -> the checkout
PUBSUB_JARS = "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar"
CBTEMULATOR = "/usr/lib/google-cloud-sdk/platform/bigtable-emulator/cbtemulator"
LOCAL_BIGQUERY_BIN = REPO / ".venv-bq" / "bin" / "local-bigquery"
DEFAULT_PROJECT = "test-project"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through an HTTP proxy


class EmulatorError(RuntimeError):
    pass


class PortInUse(EmulatorError):
    """The emulator could not listen on its port: another process has it."""


# Ports the emulator picked itself (port 0) are picked again this many times when one is taken between the pick
# and the emulator's bind (two test workers, or a demo and the tests, starting emulators at once).
PORT_ATTEMPTS = 5
# What the emulators log when their bind fails (Java's BindException, uvicorn's errno 98, grpc's add_port).
BIND_FAILURES = ("address already in use", "bindexception", "failed to bind")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Emulator:
    """One emulator process: started in its own process group (its children go
    with it), its output in a log file in a temporary directory, ready once
    `_ready` says so."""

    name = "emulator"

    def __init__(self, port: int, start_timeout_s: float) -> None:
        self._free_port = not port  # picked here, so picked again if another process takes it first
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None  # the log, and any data the emulator keeps; removed on stop

    def _command(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once it answers; raises EmulatorError if it answers with an error."""
        raise NotImplementedError

    def _listening(self, log: str) -> bool:
        """Its own log says it listens on its port: what answers there is this process, not another one
        that took the port first."""
        raise NotImplementedError

    def _ports(self) -> list[int]:
        return [self.port]

    def _pick_ports(self) -> None:
        """New free ports for those picked here (after one was taken)."""
        if self._free_port:
            self.port = free_port()

    def _picked_ports(self) -> bool:
        return self._free_port

    host_variable: str | None = None  # the variable that points a Google client at it (host:port)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment variables a client needs to use this emulator."""
        return {"NO_GCE_CHECK": "true", **({self.host_variable: self.host} if self.host_variable else {})}

    def start(self) -> Self:
        """Starts it and waits until it answers. A port it picked itself that turns out to be taken
        is picked again (PORT_ATTEMPTS in all); a port it was given is not."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start()
            except PortInUse:
                if not self._picked_ports() or attempt == PORT_ATTEMPTS:
                    raise
                self._pick_ports()
        raise AssertionError("unreachable")

    def _start(self) -> Self:
        for port in self._ports():
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    raise PortInUse(f"{self.name}: port {port} is in use (another emulator still running?)")
        self._workdir = Path(tempfile.mkdtemp(prefix="emulator-"))
        try:
            command = self._command(self._workdir)
            with open(self._workdir / "emulator.log", "wb") as log:
                self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready(command)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, command: list[str]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                log = self._log_text()
                failed = [line for line in log.splitlines() if any(m in line.lower() for m in BIND_FAILURES)]
                if failed:
                    raise PortInUse(f"could not listen on its ports {self._ports()}: {failed[0].strip()}")
                if self._process.poll() is not None:
                    raise EmulatorError(f"exited with code {self._process.returncode}")
                if self._listening(log) and self._ready():
                    return
                if time.monotonic() > deadline:
                    raise EmulatorError(f"did not answer within {self.start_timeout_s:.0f} s")
                time.sleep(0.1)
        except EmulatorError as err:
            raise type(err)(f"{self.name} ({' '.join(command)}) {err}\n--- log tail ---\n{self.log_tail()}") \
                from None

    def _log_text(self) -> str:
        log = self._workdir / "emulator.log" if self._workdir else None
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def check_running(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise EmulatorError(f"{self.name} is not running\n--- log tail ---\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        log = self._workdir / "emulator.log" if self._workdir else None
        if log is None or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self._process.pid, sig)
                    self._process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PubSubEmulator(_Emulator):
    """Google's Pub/Sub emulator (Java; ~2-4 s to start here)."""

    name = "Pub/Sub emulator"
    host_variable = "PUBSUB_EMULATOR_HOST"

    def __init__(self, port: int = 0, start_timeout_s: float = 60) -> None:
        super().__init__(port, start_timeout_s)


    def _command(self, workdir: Path) -> list[str]:
        jars = sorted(glob.glob(PUBSUB_JARS))
        if not jars:
            raise EmulatorError(f"the Pub/Sub emulator is not installed (no {PUBSUB_JARS}): "
                                "install the Google Cloud CLI component pubsub-emulator")
        return ["java", "-jar", jars[-1], "--host=127.0.0.1", f"--port={self.port}"]

    def _ready(self) -> bool:
        try:
            with _DIRECT.open(f"http://{self.host}/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _listening(self, log: str) -> bool:
        return f"Server started, listening on {self.port}" in log


class BigtableEmulator(_Emulator):
    """Google's Bigtable emulator (`cbtemulator`; well under a second to start). In memory: its
    tables go when it stops."""

    name = "Bigtable emulator"
    host_variable = "BIGTABLE_EMULATOR_HOST"

    def __init__(self, port: int = 0, start_timeout_s: float = 30) -> None:
        super().__init__(port, start_timeout_s)


    def _command(self, workdir: Path) -> list[str]:
        if not os.path.exists(CBTEMULATOR):
            raise EmulatorError(f"the Bigtable emulator is not installed (no {CBTEMULATOR}): install the Google "
                                "Cloud CLI component bigtable")
        return [CBTEMULATOR, "-host", "127.0.0.1", "-port", str(self.port)]

    def _ready(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def _listening(self, log: str) -> bool:
        return f"running on {self.host}" in log


class BigQueryEmulator(_Emulator):
    """local-bigquery (~4-6 s to start here). Its data lives in `data_dir`, a
    temporary directory removed on stop unless given."""

    name = "BigQuery emulator"

    def __init__(self, project: str = DEFAULT_PROJECT, port: int = 0, grpc_port: int = 0,
                 data_dir: str | Path | None = None, start_timeout_s: float = 60) -> None:
        super().__init__(port, start_timeout_s)
        self.project = project
        self._free_grpc_port = not grpc_port
        self.grpc_port = grpc_port or free_port()
        self.data_dir = data_dir

    def _ports(self) -> list[int]:
        return [self.port, self.grpc_port]

    def _pick_ports(self) -> None:
        super()._pick_ports()
        if self._free_grpc_port:
            self.grpc_port = free_port()

    def _picked_ports(self) -> bool:
        return self._free_port or self._free_grpc_port

    def _listening(self, log: str) -> bool:
        # local-bigquery binds its gRPC port first and exits if it cannot, then uvicorn its REST port.
        return f"Uvicorn running on http://127.0.0.1:{self.port}" in log

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self, workdir: Path) -> list[str]:
        binary = Path(os.environ.get("LOCAL_BIGQUERY_BIN", LOCAL_BIGQUERY_BIN))
        if not binary.exists():
            raise EmulatorError(f"{binary} is missing: run `make venv-bq` in {REPO} "
                                "(or set LOCAL_BIGQUERY_BIN to a local-bigquery executable)")
        return [str(binary), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--grpc-port", str(self.grpc_port), "--project", self.project,
                "--data-dir", str(self.data_dir or workdir / "data")]

    def _ready(self) -> bool:
        # Listing datasets opens DuckDB and loads its extensions: a missing one fails here, not in a test.
        url = f"{self.endpoint}/bigquery/v2/projects/{self.project}/datasets"
        try:
            with _DIRECT.open(url, timeout=5) as response:
                return response.status == 200
        except urllib.error.HTTPError as err:
            raise EmulatorError(f"answers {url} with HTTP {err.code}: {err.read().decode(errors='replace')[:500]} "
                                "(DuckDB extensions missing? run `make venv-bq`)") from None
        except OSError:
            return False


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="python -m beam_app.local.stack",
        description="Start the Pub/Sub, BigQuery (local-bigquery) and Bigtable emulators on 127.0.0.1, print the "
                    "shell exports and endpoints a client needs, and run until Ctrl-C. The BigQuery emulator needs "
                    "`make venv-bq` first.")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="BigQuery project to serve (default: %(default)s).")
    parser.add_argument("--pubsub_port", type=int, default=8085,
                        help="Pub/Sub port; 0 = any free port (default: %(default)s).")
    parser.add_argument("--bigquery_port", type=int, default=9050,
                        help="BigQuery REST port; 0 = any free port (default: %(default)s).")
    parser.add_argument("--bigtable_port", type=int, default=8086,
                        help="Bigtable port; 0 = any free port (default: %(default)s).")
    parser.add_argument("--bigquery_data_dir",
                        help="Keep BigQuery's tables in this directory across runs (default: a temporary one).")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the emulators on `kill` as on Ctrl-C
    try:
        with PubSubEmulator(args.pubsub_port) as pubsub, \
                BigQueryEmulator(args.project, args.bigquery_port, data_dir=args.bigquery_data_dir) as bigquery, \
                BigtableEmulator(args.bigtable_port) as bigtable:
            for name, value in {**pubsub.env, **bigquery.env, **bigtable.env}.items():
                print(f"export {name}={value}")
            print(f"# Pub/Sub:  {pubsub.host} (any project, e.g. projects/{args.project}/topics/events)\n"
                  f"# BigQuery: {bigquery.endpoint} (project {args.project}; e.g. --bigquery_endpoint "
                  f"{bigquery.endpoint})\n"
                  f"# Bigtable: {bigtable.host} (any project and instance, e.g. --online_table "
                  f"projects/{args.project}/instances/local/tables/features)\n# Ctrl-C stops all three.", flush=True)
            while True:
                time.sleep(1)
                pubsub.check_running()
                bigquery.check_running()
                bigtable.check_running()
    except KeyboardInterrupt:
        pass
    except EmulatorError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
