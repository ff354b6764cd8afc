"""Throwaway servers for the scale-out tests, started by the tests themselves from Debian's packages.

`PgCluster`: a real PostgreSQL cluster made by `initdb` in a temporary folder and run by `pg_ctl` on a free port of
127.0.0.1 (unix socket in the same folder, trust authentication, fsync off: a test cluster), stopped and deleted at
exit. `initdb` refuses to run as root, so as root (CI and this container) the cluster belongs to Debian's `postgres`
OS user (`runuser -u postgres`); as any other user it runs as that user.

Use the `pg` fixture (a fresh database per test) or `pg_cluster()` (one cluster per pytest process)."""
from __future__ import annotations
import atexit, glob, os, pwd, shutil, socket, subprocess, tempfile, time, uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> Path | None:
    "A PostgreSQL server program (`initdb`, `pg_ctl`, ...): Debian keeps them in /usr/lib/postgresql/<major>/bin."
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    if found: return Path(found[-1])
    w = shutil.which(name)
    return Path(w) if w else None


class PgCluster:
    "A running throwaway PostgreSQL cluster (see the module docs). `url(db)` gives a SQLAlchemy/psycopg2 URL."
    def __init__(self, fsync: bool = False):
        initdb, self.pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        if initdb is None or self.pg_ctl is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql; `make system-deps`)")
        self.dir = Path(tempfile.mkdtemp(prefix="mlnb-pg-"))           # under /tmp: reachable by the postgres user
        self.data, self.sock, self.port = self.dir/"data", self.dir/"sock", free_port()
        self.sock.mkdir()
        self.user = "postgres"
        self._as = []
        if os.geteuid() == 0:
            try: pw = pwd.getpwnam("postgres")
            except KeyError: pytest.skip("running as root needs Debian's `postgres` OS user (apt-get install postgresql)")
            for p in (self.dir, self.sock): os.chown(p, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run([str(initdb), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"])
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=300 "
                f"-c shared_buffers=32MB{'' if fsync else ' -c fsync=off -c synchronous_commit=off -c full_page_writes=off'}")
        self._run([str(self.pg_ctl), "-D", str(self.data), "-l", str(self.dir/"server.log"), "-o", opts, "-w", "-t", "60",
                   "start"])
        atexit.register(self.stop)

    def _run(self, cmd: list[str]) -> None:
        p = subprocess.run(self._as + cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if p.returncode != 0:
            log = (self.dir/"server.log").read_text()[-2000:] if (self.dir/"server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr[-2000:]}\n{log}")

    def dsn(self, db: str = "postgres") -> str: return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def url(self, db: str = "postgres") -> str:
        "A SQLAlchemy URL naming the driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, mlnb ships psycopg2."
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{db}"

    def createdb(self, name: str | None = None) -> str:
        "A new empty database; returns its URL."
        import psycopg2
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        with conn.cursor() as c: c.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.dir.exists():
            try: self._run([str(self.pg_ctl), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
            except Exception: pass
            shutil.rmtree(self.dir, ignore_errors=True)


_CLUSTER: PgCluster | None = None

def pg_cluster() -> PgCluster:
    "The PostgreSQL cluster of this pytest process (started on first use, stopped at exit)."
    global _CLUSTER
    if _CLUSTER is None: _CLUSTER = PgCluster()
    return _CLUSTER


@pytest.fixture
def pg() -> str:
    "The URL of a fresh database on the process's throwaway PostgreSQL cluster."
    return pg_cluster().createdb()
