"""Throwaway certificate authorities for the TLS tests (openssl). Template-owned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def make_certificates(folder: Path, name: str) -> dict[str, Path]:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    folder.mkdir(parents=True)

    def openssl(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True)

    subject = f"/CN={name} test CA"
    # keyUsage: Python 3.13's default (strict) verification refuses a CA without it.
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", subject,
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    extensions = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for role, extension in extensions.items():
        (folder / f"{role}.ext").write_text(extension)
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}.key",
            "-out", f"{role}.csr", "-subj", f"/CN={role}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-out", f"{role}.pem", "-extfile", f"{role}.ext",
        )  # fmt: skip
    return {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }


if __name__ == "__main__":  # the generated CI's RabbitMQ TLS listener: certificates into argv[1]
    make_certificates(Path(sys.argv[1]), "ci")
