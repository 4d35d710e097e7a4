"""Ed25519 signatures on a bundle's manifest.json (the `sign` extra: the ``cryptography`` package).

The manifest lists the sha256 of every bundled file and :func:`~dfkd_deploy.deploy.bundle.verify_bundle`
requires the bundle to hold exactly those files, so a valid signature on the manifest's bytes
covers the whole bundle. Hashes alone, stored in the same folder, prove integrity against
accidents only: whoever can rewrite a file can rewrite its hash. A signature made with a private
key the bundle never holds proves who made it.

Files: ``manifest.sig`` in the bundle (the base64 signature, one line); keys as PEM, the private
key PKCS#8 unencrypted (file mode 0600), the public key SubjectPublicKeyInfo.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from dfkd_deploy.core.errors import UsageError
from dfkd_deploy.core.io import write_text

MANIFEST = "manifest.json"   # what a signature covers (the bundle's manifest)
SIGNATURE = "manifest.sig"
PRIVATE_KEY, PUBLIC_KEY = "private.pem", "public.pem"
# Signed with the manifest's bytes, so a signature made for anything else never verifies here.
_CONTEXT = b"dfkd-deploy bundle manifest v1\n"
_INSTALL_HINT = "bundle signing needs the cryptography package: pip install 'dfkd-deploy[sign]'"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    fingerprint: str


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError(_INSTALL_HINT) from None
    return serialization, ed25519, InvalidSignature


def fingerprint(public_key) -> str:
    """First 16 hex digits of the sha256 of the raw public key: what the output names a key by."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(out_dir: str | Path) -> KeyPair:
    """Write ``private.pem`` (mode 0600) and ``public.pem`` into ``out_dir``; never overwrites."""
    serialization, ed25519, _ = _crypto()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_KEY, out / PUBLIC_KEY
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} exists: keygen does not overwrite keys (choose another --out)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(private, 0o600)   # exactly 0600 whatever the umask
    write_text(public, key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"))
    return KeyPair(private, public, fingerprint(key.public_key()))


def load_private_key(path: str | Path):
    serialization, ed25519, _ = _crypto()
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"{path}: encrypted private keys are not supported (store the key unencrypted "
                         "with mode 0600, or in a CI secret)") from None
    except ValueError:
        raise UsageError(f"{path}: not a PEM private key (make one with `dfkd-deploy bundle keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 private key (make one with `dfkd-deploy bundle keygen`)")
    return key


def load_public_key(path: str | Path):
    serialization, ed25519, _ = _crypto()
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        hint = " (that is the private key: give the public one)" if b"PRIVATE KEY" in data else ""
        raise UsageError(f"{path}: not a PEM public key{hint}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path}: not an Ed25519 public key (make one with `dfkd-deploy bundle keygen`)")
    return key


def _read_key_file(path: str | Path, kind: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: {kind} key file not found")
    if p.stat().st_size > 64 * 1024:
        raise UsageError(f"{p}: too large to be a {kind} key")
    return p.read_bytes()


def sign_manifest(bundle_dir: str | Path, private_key) -> Path:
    """Write ``manifest.sig`` for the bundle's manifest.json as it is now."""
    out = Path(bundle_dir)
    signature = private_key.sign(_CONTEXT + (out / MANIFEST).read_bytes())
    return write_text(out / SIGNATURE, base64.b64encode(signature).decode("ascii") + "\n")


def signature_problems(bundle_dir: str | Path, public_key) -> list[str]:
    """Empty when ``manifest.sig`` is a valid signature of manifest.json by ``public_key``."""
    _, _, invalid = _crypto()
    out = Path(bundle_dir)
    sig_path = out / SIGNATURE
    if not sig_path.is_file():
        return [f"{SIGNATURE} missing: the bundle is not signed (sign it with `dfkd-deploy bundle sign`)"]
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except (binascii.Error, ValueError):
        return [f"{SIGNATURE} is malformed (not base64)"]
    try:
        public_key.verify(signature, _CONTEXT + (out / MANIFEST).read_bytes())
    except invalid:
        return [f"{SIGNATURE}: signature does not match {MANIFEST} and key {fingerprint(public_key)} "
                "(changed since it was signed, or signed with another key)"]
    return []
