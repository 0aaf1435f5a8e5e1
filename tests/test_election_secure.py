"""TLS (mutual) and user/password auth against an etcd started here with those options."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from harness.etcd import find_binary
from harness.ports import free_port, wait_for_port
from service.election import ElectionConfig, Elector, EtcdError, connect
from tests.support.election import (
    TTL,
    Recorder,
    grpc_events_of_closed_loops_ignored,  # noqa: F401
    poll_until,
    running,
    single_leader,
    unique_prefix,
)

OPENSSL = shutil.which("openssl")
ETCD, ETCDCTL = find_binary("etcd"), find_binary("etcdctl")
pytestmark = pytest.mark.requires("openssl", "etcd", "etcdctl")


def _make_certs(directory: str) -> None:
    def run(*argv: str) -> None:
        subprocess.run(argv, cwd=directory, check=True, capture_output=True, timeout=30)

    run(OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run(OPENSSL, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        with open(os.path.join(directory, f"{name}.ext"), "w") as handle:
            handle.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(OPENSSL, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[dict[str, str]]:
    """An etcd serving https with client-certificate auth and user auth enabled (root/rootpw)."""
    directory = tempfile.mkdtemp(prefix="etcd-tls-")
    process = None
    try:
        _make_certs(directory)
        port, peer = free_port(), free_port()
        files = {name: os.path.join(directory, name) for name in ("ca.pem", "client.pem", "client.key")}
        process = subprocess.Popen(
            [
                ETCD, "--data-dir", os.path.join(directory, "data"),
                "--listen-client-urls", f"https://127.0.0.1:{port}",
                "--advertise-client-urls", f"https://127.0.0.1:{port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                "--cert-file", os.path.join(directory, "server.pem"),
                "--key-file", os.path.join(directory, "server.key"),
                "--client-cert-auth", "--trusted-ca-file", files["ca.pem"],
                "--log-level", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(port, timeout=15)
        ctl = [ETCDCTL, "--endpoints", f"https://127.0.0.1:{port}", "--cacert", files["ca.pem"],
               "--cert", files["client.pem"], "--key", files["client.key"], "--command-timeout", "5s"]
        for args in (["user", "add", "root:rootpw"], ["user", "grant-role", "root", "root"], ["auth", "enable"]):
            deadline_attempts = 50
            while subprocess.run(ctl + args, capture_output=True, timeout=10).returncode != 0:
                deadline_attempts -= 1
                assert deadline_attempts > 0, f"etcdctl {args} kept failing"
        yield {"endpoint": f"https://127.0.0.1:{port}", "port": str(port), **files}
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def _config(tls_etcd: dict[str, str], name: str, prefix: str, *, endpoints=None, password="rootpw") -> ElectionConfig:
    return ElectionConfig(
        endpoints or (tls_etcd["endpoint"],),
        name=name,
        prefix=prefix,
        lease_ttl=TTL,
        ca_cert=tls_etcd["ca.pem"],
        cert=tls_etcd["client.pem"],
        key=tls_etcd["client.key"],
        username="root",
        password=password,
    )


@pytest.mark.anyio
async def test_electors_over_tls_with_auth(tls_etcd: dict[str, str]) -> None:
    prefix = unique_prefix()
    port = tls_etcd["port"]
    recorder = Recorder()
    # one by IP, one by name, one with two endpoints (names resolved, certificate checked by name)
    endpoint_sets = [None, (f"https://localhost:{port}",), (f"https://localhost:{port}", f"https://127.0.0.1:{port}")]
    electors = [
        Elector(_config(tls_etcd, f"pod-{i}", prefix, endpoints=endpoints), **recorder.callbacks(f"pod-{i}"))
        for i, endpoints in enumerate(endpoint_sets)
    ]
    async with running(*electors):
        leader = await poll_until(lambda: single_leader(electors), 15, "one leader over TLS")
        assert all([await e.etcd_healthy(2.0) for e in electors])
        await leader.shutdown(drain_timeout=1.0)
        rest = [e for e in electors if e is not leader]
        await poll_until(lambda: single_leader(rest), 10, "a successor over TLS")


@pytest.mark.anyio
async def test_wrong_password_is_an_etcd_error_without_the_secret(tls_etcd: dict[str, str]) -> None:
    client = connect(_config(tls_etcd, "x", unique_prefix(), password="not-the-password"))
    try:
        with pytest.raises(EtcdError) as caught:
            await client.get(b"/anything")
        assert "not-the-password" not in str(caught.value)
    finally:
        await client.close()
