"""etcd users, role and auth for the reminder service; run by the etcd-auth Job (etcd-auth.yaml).

Idempotent: every run leaves etcd with
* user `root` (password ETCD_ROOT_PASSWORD) holding the `root` role,
* role ETCD_ROLE with read-write on the keys under ELECTION_PREFIX + "/" (the election's keys, Go's
  layout) and nothing else,
* user ETCD_USERNAME (password ETCD_PASSWORD, set again on every run: rotation) holding that role,
* authentication enabled.
A first run finds auth disabled and works anonymously; later runs log in as root.

Runs with the service's image (its Python, grpcio and aetcd's generated stubs): etcd's own image
is distroless since 3.5.7, without a shell to script etcdctl in. Every call has a timeout.
Environment: ETCD_ENDPOINTS (one https:// URL), ETCD_CA_CERT, ETCD_ROOT_PASSWORD, ETCD_USERNAME,
ETCD_PASSWORD, ELECTION_PREFIX, ETCD_ROLE (default: ETCD_USERNAME + "-election").
"""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import urlsplit

import grpc
from aetcd import rpc

TIMEOUT = 10.0
CONNECT_DEADLINE = 120.0  # the Job may start before etcd has a quorum


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _already(error: grpc.RpcError, *phrases: str) -> bool:
    return any(phrase in (error.details() or "") for phrase in phrases)


def main() -> int:
    endpoint = urlsplit(os.environ["ETCD_ENDPOINTS"].split(",")[0].strip())
    if endpoint.scheme != "https":
        print("etcd-auth: ETCD_ENDPOINTS must be https:// (passwords do not travel in clear)", file=sys.stderr)
        return 2
    with open(os.environ["ETCD_CA_CERT"], "rb") as handle:
        credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    root_password = os.environ["ETCD_ROOT_PASSWORD"]
    user, password = os.environ["ETCD_USERNAME"], os.environ["ETCD_PASSWORD"]
    role = os.environ.get("ETCD_ROLE") or f"{user}-election"
    prefix = (os.environ["ELECTION_PREFIX"].rstrip("/") + "/").encode()
    if not (root_password and password and prefix.strip(b"/")):
        print("etcd-auth: empty password or prefix", file=sys.stderr)
        return 2

    channel = grpc.secure_channel(f"{endpoint.hostname}:{endpoint.port or 2379}", credentials)
    auth = rpc.AuthStub(channel)

    # Log in as root if auth is on already; anonymous on the first run.
    deadline = time.monotonic() + CONNECT_DEADLINE
    metadata: tuple[tuple[str, str], ...] | None = None
    while True:
        try:
            token = auth.Authenticate(rpc.AuthenticateRequest(name="root", password=root_password), timeout=TIMEOUT)
            metadata = (("token", token.token),)
            print("etcd-auth: authentication is enabled; logged in as root")
            break
        except grpc.RpcError as error:
            if _already(error, "authentication is not enabled"):
                print("etcd-auth: authentication is not enabled yet; configuring it")
                break
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
                time.monotonic() < deadline
            ):
                time.sleep(2)
                continue
            print(f"etcd-auth: cannot log in as root: {error.code().name} {error.details()}", file=sys.stderr)
            return 1

    def call(method: str, request: object, *tolerated: str) -> None:
        try:
            getattr(auth, method)(request, timeout=TIMEOUT, metadata=metadata)
        except grpc.RpcError as error:
            if not (tolerated and _already(error, *tolerated)):
                raise

    exists = "already exists"
    call("UserAdd", rpc.AuthUserAddRequest(name="root", password=root_password), exists)
    call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user="root", role="root"))
    call("RoleAdd", rpc.AuthRoleAddRequest(name=role), exists)
    permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=prefix, range_end=_prefix_end(prefix))
    call("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission))
    call("UserAdd", rpc.AuthUserAddRequest(name=user, password=password), exists)
    call("UserChangePassword", rpc.AuthUserChangePasswordRequest(name=user, password=password))
    call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))
    call("AuthEnable", rpc.AuthEnableRequest())
    channel.close()
    print(f"etcd-auth: user {user!r} with role {role!r} (read-write on {prefix.decode()!r}*); auth enabled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
