"""Private servers the outage driver stops and restarts: a RabbitMQ node, a tansu (Kafka
protocol) broker and an etcd of its own, on free loopback ports, never the shared ones
that other tests use. Standard library only (it runs under a baked service's interpreter).

tansu keeps its data in S3 (its only durable storage in the shipped build; `memory://`
loses every topic at a restart): a moto S3 server stands in, started once and kept up.
The binaries come from scripts/servers.sh: TEST_TANSU_BIN and TEST_S3_SERVER_BIN.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

RABBITMQ_SERVER = (
    "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the Debian package's, not its su wrapper
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port} within {seconds} s")
        time.sleep(0.1)


class Server:
    """One server process: start, stop (SIGTERM, or SIGKILL with `kill`), restart."""

    name = "server"
    start_within_s = 60.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = open(folder / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the server

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a stop signals its whole process group
        )
        wait_for_port(self.port, self.process, self.name, self.start_within_s)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


class PrivateRabbitMQ(Server):
    """A RabbitMQ node of its own: node name, AMQP and distribution ports, database, logs,
    config and plugins (none, so no management listener competes with the shared node)."""

    name = "rabbitmq"
    start_within_s = 120.0

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.node = f"outage{self.port}@localhost"
        self.dist_port = free_port()
        (folder / "rabbitmq.conf").write_text("loopback_users = none\n")
        (folder / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        return [RABBITMQ_SERVER]

    def environment(self) -> dict[str, str]:
        folder = self.folder
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(folder / "db"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "plugins"),
            "RABBITMQ_PID_FILE": str(folder / "rabbitmq.pid"),
        }


class PrivateS3(Server):
    """moto's S3 server with one bucket, where tansu keeps its topics."""

    name = "s3"
    bucket = "tansu"

    def command(self) -> list[str]:
        return [os.environ["TEST_S3_SERVER_BIN"], "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> None:
        super().start()
        request = urllib.request.Request(f"{self.url}/{self.bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=30):
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class PrivateTansu(Server):
    """A tansu broker whose topics live in `s3` (they survive its restarts), or in memory."""

    name = "tansu"

    def __init__(self, folder: Path, s3: PrivateS3 | None = None) -> None:
        super().__init__(folder)
        self.s3 = s3

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        address = f"tcp://127.0.0.1:{self.port}"
        return [
            os.environ["TEST_TANSU_BIN"],
            "broker",
            f"--listener-url={address}",
            f"--advertised-listener-url={address}",
            f"--storage-engine=s3://{self.s3.bucket}/"
            if self.s3
            else "--storage-engine=memory://tansu/",
        ]

    def environment(self) -> dict[str, str]:
        if self.s3 is None:
            return dict(os.environ)
        return {
            **os.environ,
            "AWS_ENDPOINT": self.s3.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }


class PrivateEtcd(Server):
    name = "etcd"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.peer_port = free_port()

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        return [
            shutil.which("etcd") or "etcd",
            f"--data-dir={self.folder / 'data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
        ]
