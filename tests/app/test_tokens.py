"""Credentials decided by app/serving/access.py, whatever the protocol: bearer tokens genuine and
forged, keys that expire, and a keys file that changes under a running service."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.config import Settings
from app.serving.access import Access
from app.serving.errors import Forbidden, Unauthorized

from ..conftest import ROOT
from .access_helpers import AUDIENCE, SECRET, entry, new_key, token, write_atomically


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks_file(rsa_key, tmp_path_factory):
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return path


@pytest.fixture(scope="module")
def access(jwks_file):
    return Access(Settings(jwt_secret=SECRET, jwt_jwks_file=jwks_file))


def refusal(access: Access, secret: str, scope: str = "infer") -> Unauthorized:
    with pytest.raises(Unauthorized) as refused:
        access.admit(secret, scope, "198.51.100.7")
    return refused.value


def unsigned(claims: dict, header: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def claims(**extra: object) -> dict:
    return {"sub": "page", "aud": AUDIENCE, "scope": "infer", "exp": time.time() + 600, **extra}


def test_a_genuine_hs256_token_is_admitted_with_its_scopes(access):
    grant = access.admit(token("read infer"), "infer", "198.51.100.7")
    assert grant.credential.name == "token:page" and grant.credential.scopes == {"read", "infer"}


def test_a_genuine_rs256_token_from_the_jwks_is_admitted(access, rsa_key):
    signed = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert access.admit(signed, "infer", "198.51.100.7").credential.label == "token"


def test_alg_none_is_refused(access):
    assert refusal(access, unsigned(claims(), {"alg": "none", "typ": "JWT"})).reason == "invalid_token"


def test_a_token_signed_with_another_secret_is_refused(access):
    assert refusal(access, token("infer", secret="another-secret-of-at-least-32-bytes!")).reason == "invalid_token"


def test_hs256_signed_with_the_public_key_is_refused(access, rsa_key):
    """The HS/RS confusion: the public key, which anyone may have, used as an HMAC secret."""
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    head_and_body = unsigned(claims(), header)[:-1]
    signature = hmac.new(public_pem, head_and_body.encode(), hashlib.sha256).digest()
    forged = head_and_body + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    assert refusal(access, forged).reason == "invalid_token"


def test_rs256_claimed_for_a_key_of_another_algorithm_is_refused(access, rsa_key):
    signed = jwt.encode(claims(), rsa_key, algorithm="RS384", headers={"kid": "k1"})
    assert refusal(access, signed).reason == "invalid_token"


def test_an_expired_token_is_refused_as_expired(access):
    refused = refusal(access, token("infer", ttl=-1))
    assert refused.reason == "expired" and 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


def test_a_token_not_yet_valid_is_refused(access):
    assert refusal(access, token("infer", nbf=time.time() + 600)).reason == "not_yet_valid"


def test_a_token_for_another_audience_is_refused(access):
    assert refusal(access, token("infer", aud="another-service")).reason == "wrong_audience"


def test_a_token_without_exp_is_refused(access):
    forged = jwt.encode({"sub": "page", "aud": AUDIENCE, "scope": "infer"}, SECRET, algorithm="HS256")
    assert refusal(access, forged).reason == "invalid_token"


def test_a_token_without_the_scope_is_forbidden(access):
    with pytest.raises(Forbidden) as refused:
        access.admit(token("read"), "infer", "198.51.100.7")
    assert refused.value.scope == "infer"


def test_an_expired_key_is_refused_as_expired(tmp_path):
    key = new_key("old")
    keys = tmp_path / "keys.toml"
    keys.write_text(entry("old", key, ["read"], expires="2020-01-01T00:00:00Z"))
    assert refusal(Access(Settings(keys_file=keys)), key, "read").reason == "expired"


def test_a_changed_keys_file_is_read_again(tmp_path):
    """Rotation: the new key works and the revoked one is refused, without a restart."""
    old, new = new_key("old"), new_key("new")
    keys = tmp_path / "keys.toml"
    keys.write_text(entry("ci", old, ["read"]))
    access = Access(Settings(keys_file=keys))
    assert access.admit(old, "read", "-").credential.name == "ci"
    write_atomically(keys, entry("ci-2", new, ["read"]))
    time.sleep(0.6)  # the file is looked at every RELOAD_CHECK_S
    assert access.admit(new, "read", "-").credential.name == "ci-2"
    assert refusal(access, old, "read").reason == "unknown"


def kubelet_writes(volume: Path, files: dict[str, str]) -> None:
    """As the kubelet updates a Secret mounted as a folder: the files in a new timestamped folder,
    ``..data`` switched to it by a rename, each file a link through ``..data``, the old folder gone."""
    previous = (volume / "..data").resolve() if (volume / "..data").exists() else None
    fresh = volume / f"..{time.monotonic_ns()}"
    fresh.mkdir()
    for name, text in files.items():
        (fresh / name).write_text(text)
    (volume / "..data_tmp").symlink_to(fresh.name)
    (volume / "..data_tmp").replace(volume / "..data")
    for name in files:
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(previous)


def test_a_keys_file_in_a_kubernetes_secret_volume_is_read_again_when_the_kubelet_swaps_it(tmp_path):
    """deploy/k8s/components/access mounts the keys file so: rotation without a restart there too."""
    old, new = new_key("old"), new_key("new")
    kubelet_writes(tmp_path, {"keys.toml": entry("ci", old, ["read"])})
    access = Access(Settings(keys_file=tmp_path / "keys.toml"))
    assert access.admit(old, "read", "-").credential.name == "ci"
    kubelet_writes(tmp_path, {"keys.toml": entry("ci-2", new, ["read"])})
    time.sleep(0.6)  # the file is looked at every RELOAD_CHECK_S
    assert access.admit(new, "read", "-").credential.name == "ci-2"
    assert refusal(access, old, "read").reason == "unknown"


def test_a_broken_keys_file_leaves_the_keys_as_they_were(tmp_path):
    key = new_key("kept")
    keys = tmp_path / "keys.toml"
    keys.write_text(entry("kept", key, ["read"]))
    access = Access(Settings(keys_file=keys))
    write_atomically(keys, "[[key]]\nname = 'half-written")
    time.sleep(0.6)
    assert access.admit(key, "read", "-").credential.name == "kept"


def cli(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *arguments],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )


def test_cnnserve_token_mints_a_token_the_service_accepts_for_its_ttl():
    printed = cli("token", "--scope", "infer", "--scope", "read", "--ttl", "10m", CNNSERVE_JWT_SECRET=SECRET).stdout
    grant = Access(Settings(jwt_secret=SECRET)).admit(printed.strip(), "infer", "-")
    assert grant.credential.scopes == {"infer", "read"}
    claims = jwt.decode(printed.strip(), SECRET, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["exp"] - claims["iat"] == 600


def test_cnnserve_key_prints_a_key_and_the_entry_that_admits_it(tmp_path):
    printed = cli("key", "--name", "ci", "--scope", "read")
    keys = tmp_path / "keys.toml"
    keys.write_text(printed.stderr)
    assert Access(Settings(keys_file=keys)).admit(printed.stdout.strip(), "read", "-").credential.name == "ci"
    assert printed.stdout.strip() not in printed.stderr


def test_a_token_admitted_before_is_refused_once_it_expires(access):
    """Verified tokens are remembered (verifying costs about 70 us), but never past their exp."""
    short = token("infer", ttl=1.0)
    assert access.admit(short, "infer", "-").credential.name == "token:page"
    time.sleep(1.5)
    assert refusal(access, short).reason == "expired"
