"""A real, throw-away PostgreSQL server for the tests and `shotcache bench --only cluster`: Debian's packages,
a temp cluster, stopped by PID (no pytest here: the tests' fixtures are in tests/stores/fixtures.py).

`acquire()` installs the `postgresql` package if its binaries are missing (as root with apt-get; the
install does not create or start Debian's own cluster), runs `initdb` as the `postgres` user on a temp
dir, and starts it on 127.0.0.1 at a free port with its unix socket in another temp dir. Tests connect
over the socket (trust auth, user `postgres`). Every conftest that needs it calls `acquire()`/`release()`
from a session fixture; one server serves them all and the last release stops it (SIGINT to the
postmaster's PID: PostgreSQL's "immediate" shutdown) and removes its dirs.

Each test gets a schema of its own (`new_schema_url`): the URL's `options=-csearch_path=...` makes every
table the store creates live there, so tests never see each other's tasks.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PORTS = range(15432, 15440)
DEBIAN_BIN = Path("/usr/lib/postgresql")
_APT_TIMEOUT_S = 900


class PostgresUnavailableError(Exception):
    """PostgreSQL cannot be installed or started here (the reason is the message)."""


@dataclass
class PostgresServer:
    data_dir: Path
    socket_dir: Path
    port: int
    pid: int

    def url(self, dbname: str = "postgres", **params: str) -> str:
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"host": str(self.socket_dir), **params}.items())
        return f"postgresql://postgres@/{dbname}?port={self.port}&{query}"

    def pause(self) -> None:
        """Stop the server (fast shutdown: clients are cut off), keeping its data: an outage."""
        self._signal_and_wait(signal.SIGINT)

    def resume(self) -> None:
        """Start the paused server again on the same port and socket."""
        self.pid = _pg_ctl_start(self.data_dir, self.socket_dir, self.port)

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGQUIT)  # immediate shutdown: no checkpoint, the data is thrown away
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def _signal_and_wait(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


_server: PostgresServer | None = None
_users = 0
_schemas = itertools.count()


def acquire() -> PostgresServer:
    """The shared test server, started on first use (PostgresUnavailableError if it cannot be)."""
    global _server, _users
    if _server is None:
        _server = _start()
    _users += 1
    return _server


def release() -> None:
    global _server, _users
    _users -= 1
    if _users <= 0 and _server is not None:
        _server.stop()
        _server = None


def new_schema_url(server: PostgresServer, prefix: str = "t") -> str:
    """A URL whose tables live in a fresh, empty schema of the test database."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{next(_schemas)}"
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{name}"'.encode())
    return server.url(options=f"-csearch_path={name}")


def bin_dir() -> Path:
    """Debian's PostgreSQL binaries (newest installed version), installing the package if needed."""
    found = _find_bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailableError(
            "PostgreSQL is not installed and this is not a root Debian shell: apt-get install postgresql"
        )
    # Debian's package would create and start a cluster of its own on port 5432: tell it not to.
    conf = Path("/etc/postgresql-common/createcluster.conf")
    if not conf.exists():
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("create_main_cluster = false\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confold",
        "postgresql",
    ]
    for command in (["apt-get", "update"], install):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False)
        if result.returncode != 0:
            raise PostgresUnavailableError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    found = _find_bin_dir()
    if found is None:
        raise PostgresUnavailableError(f"apt-get installed postgresql but no initdb under {DEBIAN_BIN}")
    return found


def _find_bin_dir() -> Path | None:
    candidates = sorted(DEBIAN_BIN.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name), reverse=True)
    return candidates[0].parent if candidates else None


def _start() -> PostgresServer:
    binaries = bin_dir()
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailableError("root, but no `postgres` user to run the server as") from None
    data_dir = Path(tempfile.mkdtemp(prefix="shotcache-pg-data-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="shotcache-pg-sock-"))
    if owner is not None:
        for path in (data_dir, socket_dir):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    initdb = [*_as_postgres(), str(binaries / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres"]
    try:
        subprocess.run([*initdb, "-E", "UTF8"], capture_output=True, text=True, timeout=120, check=True)
        for port in PORTS:
            if not _port_free(port):
                continue
            try:
                pid = _pg_ctl_start(data_dir, socket_dir, port)
            except PostgresUnavailableError:
                continue  # taken meanwhile, or another problem the log shows after the last port
            return PostgresServer(data_dir, socket_dir, port, pid)
        log = (data_dir / "server.log").read_text()[-1000:] if (data_dir / "server.log").exists() else ""
        raise PostgresUnavailableError(f"PostgreSQL did not start on any port of {PORTS}: {log}")
    except subprocess.CalledProcessError as error:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise PostgresUnavailableError(f"initdb failed: {error.stderr}") from None
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root


def _pg_ctl_start(data_dir: Path, socket_dir: Path, port: int) -> int:
    """Start the cluster in `data_dir` (listening on 127.0.0.1:`port` and in `socket_dir`); its PID."""
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={socket_dir}"
    command = [*_as_postgres(), str(bin_dir() / "pg_ctl"), "-D", str(data_dir), "-o", options, "-w", "-t", "60"]
    started = subprocess.run(
        [*command, "-l", str(data_dir / "server.log"), "start"], capture_output=True, text=True, timeout=90, check=False
    )
    if started.returncode != 0:
        raise PostgresUnavailableError(f"pg_ctl start failed: {started.stderr.strip()}")
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
