"""The data plane on its own, with no HTTP: the one lookup, readiness, admission on every kind of
work, and work whose client has gone dropped before it runs."""

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from app.config import Settings
from app.serving import services as wiring
from app.serving.errors import ClientGone, NotFound, Overloaded, RequestTimeout, Unavailable
from app.serving.services import Services

from ..conftest import MODELS, png_bytes


@pytest.fixture(scope="module")
def core() -> Iterator[Services]:
    services = wiring.build(Settings(models_dir=MODELS, default_model="lenet5", max_queue=4, inference_workers=1))
    services.repository.load_all()
    yield services
    asyncio.run(services.repository.close())


def lenet_png(photos) -> bytes:
    from PIL import Image

    return png_bytes(Image.open(photos["chelsea"]).convert("L").resize((28, 28)))


def held(services: Services, name: str) -> tuple[threading.Event, asyncio.Future]:
    """Occupies the model's one worker until the event is set."""
    hold = threading.Event()
    model = services.repository.get(name)
    return hold, model.batcher.call(lambda: hold.wait(10), timeout=30)


def dropped(services: Services, model: str, reason: str) -> float:
    value = services.metrics.registry.get_sample_value("cnnserve_dropped_total", {"model": model, "reason": reason})
    return value or 0.0


def test_the_core_classifies_bytes_without_any_web_framework(core, photos):
    answer = asyncio.run(core.service.classify("efficientnet_lite0", photos["chelsea"].read_bytes(), top_k=3))
    assert answer.model == "efficientnet_lite0"
    assert answer.predictions[0].label in {"tiger cat", "Egyptian Mau", "tabby cat"}


def test_no_name_means_the_default_model(core):
    assert core.repository.get(None).name == "lenet5"


def test_an_unknown_model_or_version_is_not_found(core):
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        core.repository.get("nope")
    with pytest.raises(NotFound, match=r"no version .2. served; served versions: 1"):
        core.repository.get("lenet5", "2")
    assert core.repository.get("lenet5", "1").name == "lenet5"


def test_a_refused_model_is_unavailable_with_its_reason(repo_copy):
    (repo_copy / "kernels" / "model.onnx").write_bytes(b"not onnx")
    services = wiring.build(Settings(models_dir=repo_copy, default_model="lenet5"))
    services.repository.load_all()
    with pytest.raises(Unavailable, match=r"failed to load: model\.onnx sha256") as refused:
        services.repository.get("kernels")
    assert refused.value.status == 503


def test_while_loading_every_lookup_says_come_back(repo_copy):
    services = wiring.build(Settings(models_dir=repo_copy, default_model="lenet5"))
    with pytest.raises(Unavailable, match="still loading") as loading:
        services.repository.get("lenet5")
    assert loading.value.headers == {"Retry-After": "1"}
    assert services.service.readiness().status == "loading"


def test_readiness_follows_loading_and_draining(repo_copy):
    services = wiring.build(Settings(models_dir=repo_copy, default_model="lenet5"))
    services.repository.load_all()
    assert services.service.readiness().ready
    services.lifecycle.draining = True
    readiness = services.service.readiness()
    assert not readiness.ready and readiness.status.startswith("draining")


def second_while_first_waits(core: Services, call) -> tuple[object, object]:
    """With the model's worker held: the first ``call()`` queued, then a second one's outcome
    (the error it raised, or None), then, once the worker is free, the first one's answer."""

    async def scenario() -> tuple[object, object]:
        hold, blocker = held(core, "lenet5")
        first = asyncio.ensure_future(call())
        await asyncio.sleep(0.05)
        try:
            await call()
        except Overloaded as error:
            refused: object = error
        else:
            refused = None
        hold.set()
        await blocker
        return refused, await first

    return asyncio.run(scenario())


def test_feature_maps_are_refused_at_the_door_when_the_model_is_full(core, photos):
    """A feature-map job takes a whole batch's turn, so it costs max_batch of the capacity:
    max_queue 4 + max_batch 8 x 1 worker = 12, room for one job while the worker is held."""
    image = lenet_png(photos)
    refused, maps = second_while_first_waits(core, lambda: core.service.featuremaps("lenet5", image))
    assert isinstance(refused, Overloaded) and refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert maps.media_type == "image/png" and maps.body.startswith(b"\x89PNG")


def test_tensor_inference_shares_the_admission_of_images(core, monkeypatch):
    """Eight images cost eight of the twelve: a second such request is refused while the first waits
    (in the queue: LeNet-5 would run a batch of eight at once on the event loop)."""
    monkeypatch.setattr(core.repository.get("lenet5").batcher, "inline_batch", 0)
    batch = np.zeros((8, 1, 28, 28), np.float32)
    refused, done = second_while_first_waits(core, lambda: core.service.infer("lenet5", {"input": batch}))
    assert isinstance(refused, Overloaded)
    assert done.values.shape == (8, 10)


def test_a_feature_map_whose_client_has_gone_is_never_computed(core, photos):
    image = lenet_png(photos)
    before = dropped(core, "lenet5", "client gone")

    async def scenario() -> object:
        hold, blocker = held(core, "lenet5")
        left = asyncio.Event()
        request = asyncio.ensure_future(core.service.featuremaps("lenet5", image, gone=left.wait))
        await asyncio.sleep(0.05)
        left.set()
        try:
            await request
        except ClientGone as error:
            outcome: object = error
        hold.set()
        await blocker
        await asyncio.sleep(0.05)  # the worker reaches the abandoned job and drops it
        return outcome

    outcome = asyncio.run(scenario())
    assert isinstance(outcome, ClientGone) and outcome.status == 499
    assert dropped(core, "lenet5", "client gone") == before + 1


def test_a_layer_the_model_lacks_is_not_found_before_any_work(core, photos):
    with pytest.raises(NotFound, match="unknown layer"):
        asyncio.run(core.service.featuremaps("lenet5", lenet_png(photos), layer="no.such.layer"))


def test_an_upload_slower_than_a_request_may_wait_is_408_and_frees_its_place(repo_copy):
    services = wiring.build(Settings(models_dir=repo_copy, default_model="lenet5", request_timeout_s=0.2))
    services.repository.load_all()
    batcher = services.repository.get("lenet5").batcher

    async def trickle() -> bytes:
        await asyncio.sleep(5)
        return b""

    with pytest.raises(RequestTimeout) as slow:
        asyncio.run(services.service.classify("lenet5", trickle, top_k=1))
    assert slow.value.status == 408 and batcher.admitted == 0
