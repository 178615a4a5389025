"""Fixed batch shapes with bound buffers, FP16 checked at load, and TensorRT reported: what a model
gets on an accelerator, run here on the CPU provider with real sessions."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.config import Settings
from app.serving import accelerated, precision
from app.serving.loader import inference, read_spec
from app.serving.owner import load_model
from app.serving.runtime import CPU, ShapedRunner, tensorrt_status
from app.sizing import accelerator_plan

from ..conftest import MODELS, spec_of


@pytest.fixture(scope="module")
def lenet():
    session = ort.InferenceSession(str(MODELS / "lenet5" / "model.onnx"), providers=[CPU])
    images = np.random.default_rng(7).normal(size=(40, 1, 28, 28)).astype(np.float32)
    return session, images


class Counting:
    """A real session that records the batch size of every bound run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.sizes = session, []

    def io_binding(self):
        return self.session.io_binding()

    def run_with_iobinding(self, binding) -> None:
        self.sizes.append(binding.get_outputs()[0].shape()[0])
        self.session.run_with_iobinding(binding)


def runner_of(session, shapes=(1, 4, 16)) -> tuple[ShapedRunner, Counting]:
    counting = Counting(session)
    return ShapedRunner(dict.fromkeys(shapes, counting), ("input", "logits"), (1, 28, 28, 10)), counting


def test_a_batch_runs_at_the_smallest_shape_that_holds_it(lenet):
    session, images = lenet
    runner, counting = runner_of(session)
    for size in (1, 3, 4, 5, 16):
        runner.run(images[:size])
    assert counting.sizes == [1, 4, 4, 16, 16]


def test_each_batch_gets_exactly_its_own_rows_as_the_unbound_session_gives_them(lenet):
    session, images = lenet
    runner, _ = runner_of(session)
    runner.run(images[20:36])  # leaves other images in the bound buffer's rows
    for size in (1, 3, 7):
        expected = session.run(None, {"input": images[:size]})[0]
        assert np.allclose(runner.run(images[:size]), expected, atol=1e-5)


def test_a_batch_larger_than_the_largest_shape_runs_in_chunks_of_it(lenet):
    session, images = lenet
    runner, counting = runner_of(session)
    rows = runner.run(images[:37])
    assert counting.sizes == [16, 16, 16]
    assert np.allclose(rows, session.run(None, {"input": images[:37]})[0], atol=1e-5)


def test_parts_from_several_requests_are_copied_into_one_run(lenet):
    session, images = lenet
    runner, counting = runner_of(session)
    with runner.lock:
        rows = runner.run_parts([images[:1], images[1:4]]).copy()
    assert counting.sizes == [4]
    assert np.allclose(rows, session.run(None, {"input": images[:4]})[0], atol=1e-5)


def test_fp16_is_served_when_it_keeps_every_top1_and_its_logits_close():
    spec = read_spec(MODELS / "lenet5")
    settings = Settings(precision="fp16", batch_shapes="1,4", providers="cpu")
    shaped = accelerated.build(onnx.load(MODELS / "lenet5" / "model.onnx"), MODELS / "lenet5", spec, settings)
    assert shaped.precision == "fp16" and 0 < shaped.fp16_change <= precision.FP16_TOLERANCE
    assert "fp16" in shaped.describe() and shaped.provider == CPU


def test_fp16_that_moves_logits_beyond_the_tolerance_is_refused_with_the_figure(lenet):
    session, images = lenet

    def fp32(batch):
        return session.run(None, {"input": batch})[0]

    def moved(batch):
        """The least likely class of each row raised by 5% of the spread: no top-1 changes."""
        logits = fp32(batch)
        lowest = np.arange(logits.shape[1]) == logits.argmin(axis=1)[:, None]
        return logits + 0.05 * (logits.max() - logits.min()) * lowest

    with pytest.raises(precision.PrecisionRefused, match=re.escape("5.00% of the FP32 spread")):
        precision.check(fp32, moved, images[:4])


def test_fp16_that_changes_a_top1_is_refused(lenet):
    session, images = lenet

    def fp32(batch):
        return session.run(None, {"input": batch})[0]

    def flipped(batch):
        return fp32(batch)[:, ::-1]

    with pytest.raises(precision.PrecisionRefused, match="top-1 of 4 of 4"):
        precision.check(fp32, flipped, images[:4])


def test_samples_without_a_samples_folder_are_the_same_synthetic_images_every_time():
    spec = read_spec(MODELS / "efficientnet_lite0")
    first = precision.samples(MODELS / "efficientnet_lite0", spec.input, 50_000_000)
    assert first.shape == (precision.SYNTHETIC_SAMPLES, 3, 224, 224)
    assert np.array_equal(first, precision.samples(MODELS / "efficientnet_lite0", spec.input, 50_000_000))


def test_tensorrt_is_reported_absent_with_the_reason_where_onnxruntime_lacks_it():
    assert tensorrt_status([CPU]).startswith("absent: ")
    assert tensorrt_status([CPU, "TensorrtExecutionProvider"]) == "present"


def test_a_demanded_cuda_this_machine_lacks_refuses_the_model_with_the_reason():
    spec = read_spec(MODELS / "lenet5")
    settings = Settings(providers="cuda", batch_shapes="1,4")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(accelerated.Refused, match="onnxruntime-gpu"):
        accelerated.build(onnx.load(MODELS / "lenet5" / "model.onnx"), MODELS / "lenet5", spec, settings)


def test_a_server_process_with_its_own_accelerator_session_runs_the_requests_unjoined(lenet):
    """The per-process candidate's wiring: the loader's call on a plan with batch shapes."""
    session, images = lenet
    settings = Settings(providers="cpu", batch_shapes="1,4")
    spec = read_spec(MODELS / "lenet5")
    plan = accelerator_plan(settings, processes=1, cpus=1)
    proto = onnx.load(MODELS / "lenet5" / "model.onnx")
    run_parts, providers = inference(MODELS / "lenet5", spec, proto, settings, plan, None, "1")
    assert providers == (CPU,) and plan.max_batch == 4
    rows = run_parts([images[:1], images[1:3], images[3:6]])
    assert np.allclose(rows, session.run(None, {"input": images[:6]})[0], atol=1e-5)


def test_model_json_asks_for_fp16_per_model(repo_copy, lenet):
    """The inference process reads model.json's ``serving.precision`` over the global setting."""
    session, images = lenet
    folder = repo_copy / "lenet5"
    spec = spec_of(folder)
    spec["serving"] = {"precision": "fp16"}
    (folder / "model.json").write_text(json.dumps(spec))
    shaped = load_model(folder, "lenet5", spec["sha256"], Settings(providers="cpu", batch_shapes="1,4"), 0)
    assert shaped.precision == "fp16"
    rows, expected = shaped.runner.run(images[:4]), session.run(None, {"input": images[:4]})[0]
    assert not np.array_equal(rows, expected) and np.allclose(rows, expected, atol=0.05)
