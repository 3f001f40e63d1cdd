"""Where a walletd process gets the cluster credential its internal listener requires.

In order (the first one given wins)::

    WALLETD_CLUSTER_CREDENTIAL          the secret itself, from the environment only
    --cluster-credential-file PATH      a file holding it (a path on the command line,
    / WALLETD_CLUSTER_CREDENTIAL_FILE   never the secret)
    DATA_DIR/cluster-credential         the default file

A file that does not exist is created with a fresh random credential, mode 0600, atomically
(written aside, then hard-linked into place: of processes starting at once, exactly one
creates it and the others read the one it wrote). So every process started with the same
data dir or the same file (`walletd cluster`, a shared volume in docker-compose) shares one
credential with no operator step; processes on other machines are given the same file or
variable by the operator (docs/OPERATIONS.md). A file readable by group or others is
refused, as ssh refuses such a key, and so is a credential equal to a client API key: the
two kinds must never be interchangeable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from walletd.cli.config import Config
from walletd.http.internal import ClusterCredential
from walletd.http.keys import KeyRing

__all__ = ["CREDENTIAL_FILE_NAME", "cluster_credential", "credential_path"]

CREDENTIAL_FILE_NAME = "cluster-credential"
# A credential file is one short line; anything longer is not one.
_FILE_BYTES_MAX = 4096


def credential_path(config: Config) -> Path:
    """The credential file this configuration uses (when no variable gives the secret)."""
    if config.cluster_credential_file is not None:
        return config.cluster_credential_file
    return config.data_dir / CREDENTIAL_FILE_NAME


def cluster_credential(config: Config) -> ClusterCredential:
    """The cluster credential, creating its file when missing; ``ValueError`` (or
    ``OSError``) naming the problem when it cannot be used."""
    if config.cluster_credential:
        credential = ClusterCredential(config.cluster_credential)
    else:
        credential = _from_file(credential_path(config))
    keys = config.client_keys  # WALLETD_API_KEYS and the keys file, both
    if keys and KeyRing(keys).find(credential.secret.encode("ascii")) is not None:
        raise ValueError(
            "the cluster credential equals a client API key; the processes' credential must "
            "be one no client holds (remove the key, or the credential file to get a new one)"
        )
    return credential


def _from_file(path: Path) -> ClusterCredential:
    if not path.exists():
        _create(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{path} is readable by others (mode {stat.S_IMODE(mode):04o}); "
            f"`chmod 600 {path}`: it holds the cluster credential"
        )
    with path.open("rb") as file:
        text = file.read(_FILE_BYTES_MAX + 1)
    if len(text) > _FILE_BYTES_MAX:
        raise ValueError(f"{path} is not a cluster credential file (too long)")
    try:
        return ClusterCredential(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(ClusterCredential.generate().secret.encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())
        # link() fails when the name exists: a process that started at the same instant
        # created it first, and its credential is the one everybody reads.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)
