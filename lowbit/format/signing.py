"""Authenticity of an artifact: an Ed25519 signature of its ``manifest.json``, which lists every file's
sha256, so one signature covers the whole folder. ``lowbit keygen`` makes a key pair, ``lowbit sign`` writes
``manifest.sig``, ``lowbit verify`` (``verify_signature``) and ``lowbit.load(dir, verify=PUBLIC_KEY)``
(``open_manifest``) check it before anything else is read. Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), the form
``openssl genpkey -algorithm ed25519`` writes too. Needs the ``cryptography`` package (``lowbit[sign]``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.format.artifact import MANIFEST, SIGNATURE_FILE, output_lock, read_manifest


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise LowbitError("signing needs the cryptography package: pip install 'lowbit[sign]'") from None
    return serialization, ed25519, InvalidSignature


def keygen(prefix) -> tuple[Path, Path]:
    """Write a new key pair: ``PREFIX.key`` (private, readable by this user only) and ``PREFIX.pub``."""
    serialization, ed25519, _ = _crypto()
    private, public = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (private, public):
        if p.exists():
            raise LowbitError(f"'{p}' already exists; choose another name (keys are never overwritten)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _load_key(file, private: bool):
    serialization, ed25519, _ = _crypto()
    kind = "private" if private else "public"
    try:
        data = Path(file).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as e:
        raise LowbitError(f"cannot read the {kind} key '{file}' ({str(e)[:80]}); give a PEM file as "
                          "'lowbit keygen' writes") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise LowbitError(f"'{file}' is not an Ed25519 {kind} key; lowbit signs with Ed25519 ('lowbit keygen')")
    return key


def sign(path, private_key) -> Path:
    """Sign the artifact at ``path`` (its hashes are checked first); returns the signature file."""
    path = Path(path)
    key = _load_key(private_key, private=True)
    with output_lock(path):
        read_manifest(path)
        signature = key.sign((path / MANIFEST).read_bytes())
        tmp = path / f".{SIGNATURE_FILE}.tmp-{os.getpid()}"
        tmp.write_bytes(signature)
        os.replace(tmp, path / SIGNATURE_FILE)
    return path / SIGNATURE_FILE


def verify_signature(path, public_key) -> dict:
    """The manifest of the artifact at ``path`` once its signature by ``public_key``'s owner and every file's
    hash are checked; LowbitError otherwise."""
    path = Path(path)
    _, _, invalid = _crypto()
    key = _load_key(public_key, private=False)
    sig_file = path / SIGNATURE_FILE
    if not sig_file.is_file() or sig_file.is_symlink():
        raise LowbitError(f"artifact '{path}' is not signed (no {SIGNATURE_FILE}); ask its author to 'lowbit sign' it")
    signed = (path / MANIFEST).read_bytes() if (path / MANIFEST).is_file() else b""
    try:
        key.verify(sig_file.read_bytes(), signed)
    except invalid:
        raise LowbitError(f"artifact '{path}': the signature does not match {public_key}'s key (changed since it "
                          "was signed, or signed by someone else); do not run it") from None
    manifest = read_manifest(path)
    if (path / MANIFEST).read_bytes() != signed:
        raise LowbitError(f"artifact '{path}': {MANIFEST} changed while it was verified; try again")
    return manifest


def open_manifest(path, verify=True) -> dict:
    """The manifest a runtime trusts: ``verify`` True checks every file's hash, a public key file (str or Path)
    also the artifact's signature by its owner (``format.signing``), False only the manifest's structure."""
    if isinstance(verify, (str, os.PathLike)):
        return verify_signature(path, verify)
    return read_manifest(path, verify=bool(verify))
