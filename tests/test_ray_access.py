"""The Ray ingress applies the same access control as `cnnserve serve`: it is the same app
(create_app) over a RemoteService, so the same middleware decides, from the same keys file. Built
in process here, without a cluster: the scopes are decided before any request reaches a replica."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray", reason="the Ray path needs cnnserve[ray]")

from fastapi.testclient import TestClient

from app.config import Settings
from app.http.app import create_app
from app.rayserve.remote import ingress_services
from tests.app.access_helpers import entry, new_key

READ, ADMIN = new_key("read"), new_key("admin")


@pytest.fixture(scope="module")
def ingress(tmp_path_factory):
    keys = tmp_path_factory.mktemp("ray-keys") / "keys.toml"
    keys.write_text(entry("reader", READ, ["read"]) + entry("admin", ADMIN, ["admin"]))
    services = asyncio.run(ingress_services(Settings(keys_file=keys, default_model="lenet5"), {}))
    with TestClient(create_app(services=services)) as client:
        yield client


def test_the_ingress_wants_a_credential(ingress):
    assert ingress.get("/models").status_code == 401
    assert ingress.get("/healthz").status_code == 200


def test_the_ingress_grants_each_key_its_scopes_only(ingress):
    assert ingress.get("/models", headers={"X-API-Key": READ}).status_code == 200
    assert ingress.get("/metrics", headers={"X-API-Key": READ}).status_code == 403
    assert ingress.get("/metrics", headers={"X-API-Key": ADMIN}).status_code == 200
    assert ingress.post("/classify", headers={"X-API-Key": READ}).status_code == 403
