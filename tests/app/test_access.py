"""Who may do what over HTTP: every endpoint against every scope, with named keys from a keys file,
the single CNNSERVE_API_KEY, and bearer tokens; the probes and the page open to everyone."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import tracing
from app.config import Settings

from ..conftest import running_client
from .access_helpers import SCOPES, SECRET, entry, new_key, token

# every route, with the scope it needs ("open": none)
ROUTE_SCOPES = {
    ("GET", "/"): "open",
    ("GET", "/healthz"): "open",
    ("GET", "/readyz"): "open",
    ("GET", "/v2/health/live"): "open",
    ("GET", "/v2/health/ready"): "open",
    ("GET", "/metrics"): "admin",
    ("POST", "/v2/repository/index"): "admin",
    ("POST", "/v2/repository/models/{name}/load"): "admin",
    ("POST", "/v2/repository/models/{name}/unload"): "admin",
    ("POST", "/explain"): "explain",
    ("POST", "/classify"): "infer",
    ("POST", "/featuremaps"): "infer",
    ("POST", "/cam"): "infer",
    ("POST", "/preprocess"): "infer",
    ("POST", "/explain/input"): "infer",
    ("POST", "/v2/models/{name}/infer"): "infer",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "infer",
    ("GET", "/models"): "read",
    ("GET", "/models/{name}"): "read",
    ("GET", "/models/{name}/layers"): "read",
    ("GET", "/models/{name}/kernels"): "read",
    ("GET", "/models/{name}/layers/{layer}/exemplars"): "read",
    ("GET", "/v2"): "read",
    ("GET", "/v2/models/{name}"): "read",
    ("GET", "/v2/models/{name}/versions/{version}"): "read",
    ("GET", "/v2/models/{name}/config"): "read",
    ("GET", "/v2/models/{name}/ready"): "read",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "read",
    ("GET", "/openapi.json"): "read",
    ("GET", "/docs"): "read",
    ("GET", "/docs/oauth2-redirect"): "read",
    ("GET", "/redoc"): "read",
}
PARAMETERS = {"{name}": "lenet5", "{version}": "1", "{layer}": "conv1"}
UNDESCRIBED = {
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
KEYS = {scope: new_key(scope) for scope in SCOPES}
MASTER = new_key("master")


def concrete(template: str) -> str:
    if template.startswith("/v2/repository/"):
        template = template.replace("{name}", "no_such_model")  # the admin key may load and unload it
    for parameter, value in PARAMETERS.items():
        template = template.replace(parameter, value)
    return template


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("access") / "keys.toml"
    path.write_text("".join(entry(f"only-{scope}", key, [scope]) for scope, key in KEYS.items()))
    return path


@pytest.fixture(scope="module")
def guarded(keys_file, tmp_path_factory):
    """Explicit model control, so that the repository API exists; LeNet-5 alone, so it starts at once."""
    settings = Settings(
        keys_file=keys_file,
        api_key=MASTER,
        jwt_secret=SECRET,
        model_control="explicit",
        load_models="lenet5",
        default_model="lenet5",
    )
    with running_client(settings) as client:
        yield client


def routes_of(app) -> set[tuple[str, str]]:
    """Every route of the API, from its OpenAPI description, and those it leaves out."""
    described = {(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations}
    return described | UNDESCRIBED


def test_every_route_has_a_scope_in_this_table(guarded):
    """A new route must say which scope it needs here, or this fails (and its scope is untested)."""
    assert routes_of(guarded.app) == set(ROUTE_SCOPES)


@pytest.mark.parametrize(("method", "template"), sorted(ROUTE_SCOPES))
def test_without_a_credential_only_open_routes_answer(guarded, method, template):
    response = guarded.request(method, concrete(template))
    if ROUTE_SCOPES[method, template] == "open":
        assert response.status_code == 200
    else:
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="cnnserve"'


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(("method", "template"), sorted(k for k, v in ROUTE_SCOPES.items() if v != "open"))
def test_a_key_opens_the_routes_of_its_scope_and_no_other(guarded, method, template, scope):
    needed = ROUTE_SCOPES[method, template]
    response = guarded.request(method, concrete(template), headers={"X-API-Key": KEYS[scope]})
    if scope == needed:
        assert response.status_code not in (401, 403), response.text
    else:
        assert response.status_code == 403, response.text
        assert f'scope="{needed}"' in response.headers["www-authenticate"]
        assert needed in response.text


@pytest.mark.parametrize(("method", "template"), sorted(k for k, v in ROUTE_SCOPES.items() if v != "open"))
def test_the_single_api_key_has_every_scope(guarded, method, template):
    response = guarded.request(method, concrete(template), headers={"Authorization": f"Bearer {MASTER}"})
    assert response.status_code not in (401, 403), response.text


def test_a_token_carries_its_scopes(guarded, photos):
    image = photos["chelsea"].read_bytes()
    both = {"Authorization": f"Bearer {token('read infer')}"}
    assert guarded.post("/classify", files={"file": image}, headers=both).status_code == 200
    assert guarded.get("/models", headers=both).status_code == 200
    assert guarded.get("/metrics", headers=both).status_code == 403


def test_a_full_model_tells_a_stranger_401_and_a_key_without_the_scope_403_not_its_load(guarded, photos):
    batcher = guarded.app.state.services.repository.get("lenet5").batcher
    image = {"files": {"file": photos["chelsea"].read_bytes()}}
    with batcher.admission(cost=batcher.capacity):
        assert guarded.post("/classify", **image).status_code == 401
        assert guarded.post("/classify", **image, headers={"X-API-Key": KEYS["read"]}).status_code == 403
        assert guarded.post("/classify", **image, headers={"X-API-Key": KEYS["infer"]}).status_code == 429


def test_an_unknown_key_is_401_with_an_invalid_token_challenge(guarded):
    response = guarded.get("/models", headers={"X-API-Key": KEYS["read"] + "x"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_unknown_paths_need_a_credential(guarded):
    """A stranger learns nothing of the API's shape: 401, not 404."""
    assert guarded.get("/no/such/path").status_code == 401
    assert guarded.get("/no/such/path", headers={"X-API-Key": KEYS["read"]}).status_code == 404


def test_refusals_are_counted_by_reason_and_requests_by_credential(guarded):
    guarded.get("/models", headers={"X-API-Key": KEYS["infer"]})
    guarded.get("/models", headers={"X-API-Key": KEYS["read"]})
    text = guarded.get("/metrics", headers={"X-API-Key": KEYS["admin"]}).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    refusals = {
        s.labels["reason"]: s.value for s in families["cnnserve_access_refusals"].samples if s.name.endswith("_total")
    }
    by_name = {
        s.labels["credential"]: s.value
        for s in families["cnnserve_credential_requests"].samples
        if s.name.endswith("_total")
    }
    assert refusals["insufficient_scope"] >= 1 and refusals["missing"] >= 1
    assert by_name["only-read"] >= 1 and by_name["only-admin"] >= 1
    assert not any(key in text for key in KEYS.values())


class Lines(logging.Handler):
    """The audit lines as a deployment's log shows them, request id included (app/tracing.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(tracing.RequestIdFilter())
        self.setFormatter(logging.Formatter("%(message)s%(request)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_refusals_and_admin_actions_are_logged_with_name_address_and_request_id(guarded):
    audit, lines = logging.getLogger("cnnserve.audit"), Lines()
    audit.addHandler(lines)
    try:
        guarded.post("/v2/repository/index", headers={"X-API-Key": KEYS["admin"], "X-Request-ID": "audit-1"})
        guarded.post("/v2/repository/index", headers={"X-API-Key": KEYS["read"], "X-Request-ID": "audit-2"})
    finally:
        audit.removeHandler(lines)
    admitted = next(line for line in lines.lines if line.startswith("admin POST /v2/repository/index"))
    refused = next(line for line in lines.lines if line.startswith("refused POST /v2/repository/index"))
    assert "credential=only-admin client=testclient" in admitted and admitted.endswith("request_id=audit-1")
    assert "credential=only-read client=testclient reason=insufficient_scope" in refused
    assert refused.endswith("request_id=audit-2")
    assert not any(KEYS["admin"] in line or KEYS["read"] in line for line in lines.lines)
