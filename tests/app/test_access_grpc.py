"""Who may do what over gRPC: every method of the GRPCInferenceService against every scope, with
the credential in the metadata, against a real `cnnserve serve` (the same keys file as HTTP)."""

from __future__ import annotations

import shutil

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.grpc.servicer import METHOD_SCOPES

from ..conftest import MODELS, free_port, live_server
from .access_helpers import SCOPES, entry, new_key

KEYS = {scope: new_key(scope) for scope in SCOPES}
LIMITED = new_key("limited")
REQUESTS = {
    "ServerLive": service_pb2.ServerLiveRequest(),
    "ServerReady": service_pb2.ServerReadyRequest(),
    "ModelReady": service_pb2.ModelReadyRequest(name="lenet5"),
    "ServerMetadata": service_pb2.ServerMetadataRequest(),
    "ModelMetadata": service_pb2.ModelMetadataRequest(name="lenet5"),
    "ModelInfer": service_pb2.ModelInferRequest(model_name="lenet5"),  # no tensors: INVALID_ARGUMENT, once admitted
    "RepositoryIndex": service_pb2.RepositoryIndexRequest(),
    "RepositoryModelLoad": service_pb2.RepositoryModelLoadRequest(model_name="no_such_model"),
    "RepositoryModelUnload": service_pb2.RepositoryModelUnloadRequest(model_name="no_such_model"),
}
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc-access")
    shutil.copytree(MODELS / "lenet5", folder / "models" / "lenet5")
    keys = folder / "keys.toml"
    keys.write_text(
        "".join(entry(f"only-{scope}", key, [scope]) for scope, key in KEYS.items())
        + entry("limited", LIMITED, ["read"], rate=0.1, burst=1)
    )
    port = free_port()
    with (
        live_server(
            CNNSERVE_MODELS_DIR=str(folder / "models"),
            CNNSERVE_DEFAULT_MODEL="lenet5",
            CNNSERVE_PROCESSES="1",
            CNNSERVE_GRPC_PORT=str(port),
            CNNSERVE_MODEL_CONTROL="explicit",
            CNNSERVE_LOAD_MODELS="lenet5",
            CNNSERVE_KEYS_FILE=str(keys),
        ),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def call(stub, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        getattr(stub, method)(REQUESTS[method], metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_every_method_has_a_request_here():
    assert set(REQUESTS) == set(METHOD_SCOPES)


@pytest.mark.parametrize("method", sorted(METHOD_SCOPES))
def test_without_a_credential_only_the_probes_answer(stub, method):
    code = call(stub, method)
    if METHOD_SCOPES[method] == "open":
        assert code == grpc.StatusCode.OK
    else:
        assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("method", sorted(m for m, s in METHOD_SCOPES.items() if s != "open"))
def test_a_key_opens_the_methods_of_its_scope_and_no_other(stub, method, scope):
    code = call(stub, method, (("x-api-key", KEYS[scope]),))
    if METHOD_SCOPES[method] == scope:
        assert code not in REFUSED
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_bearer_credential_in_authorization_metadata_works(stub):
    assert call(stub, "ModelMetadata", (("authorization", f"Bearer {KEYS['read']}"),)) == grpc.StatusCode.OK


def test_two_credentials_in_the_metadata_are_refused(stub):
    metadata = (("x-api-key", KEYS["read"]), ("authorization", f"Bearer {KEYS['admin']}"))
    assert call(stub, "RepositoryIndex", metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_a_call_over_its_rate_limit_is_resource_exhausted_with_when_to_retry(stub):
    metadata = (("x-api-key", LIMITED),)
    stub.ModelMetadata(REQUESTS["ModelMetadata"], metadata=metadata, timeout=30)  # the burst of one
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelMetadata(REQUESTS["ModelMetadata"], metadata=metadata, timeout=30)
    trailing = dict(refused.value.trailing_metadata())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(trailing["retry-after"]) >= 1 and trailing["ratelimit-policy"] == '"cnnserve";q=1;w=10'
