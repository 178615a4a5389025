"""Execution-provider selection and sizing, tested on this CPU machine, and what /models says a
model got."""

import pytest

from app.config import Settings
from app.serving.runtime import CPU, CUDA, ProviderUnavailable, accelerated, choose_providers
from app.sizing import MAX_AUTO_PROCESSES, available_cpus, cpu_share, first_guess, plan, process_count

from ..conftest import running_client


def test_cpu_preference_gives_only_the_cpu():
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]


def test_auto_takes_cuda_first_when_onnxruntime_offers_it():
    chosen = choose_providers("auto", ["TensorrtExecutionProvider", CUDA, CPU])
    assert chosen[0][0] == CUDA and chosen[-1] == CPU


def test_auto_falls_back_to_the_cpu_without_cuda():
    assert choose_providers("auto", [CPU]) == [CPU]


def test_demanding_cuda_without_it_raises_with_advice():
    with pytest.raises(ProviderUnavailable, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])


def test_demanded_cuda_on_a_cpu_machine_refuses_the_models_visibly(repo_copy):
    with running_client(Settings(models_dir=repo_copy, default_model="lenet5", providers="cuda")) as client:
        info = client.get("/models/lenet5").json()
        assert info["status"] == "failed" and "CUDA" in info["reason"]
        assert client.get("/readyz").status_code == 503


def test_models_report_the_provider_their_session_really_got(client):
    for info in client.get("/models").json()["models"]:
        assert info["provider"] == CPU and info["providers"] == [CPU]


def threads_and_workers(settings: Settings, seconds_per_image: float, processes: int = 1) -> tuple[int, int]:
    chosen = plan(settings, processes, seconds_per_image, on_cpu=True)
    return chosen.threads, chosen.workers


def test_thread_count_defaults_to_the_cpus_available():
    assert first_guess(Settings(), processes=1) == available_cpus() >= 1
    assert first_guess(Settings(intra_op_threads=1), processes=1) == 1


def test_slow_models_get_a_worker_per_core_and_fast_ones_one_worker_with_every_core():
    cpus = available_cpus()
    assert threads_and_workers(Settings(), seconds_per_image=0.003) == (1, cpus)
    assert threads_and_workers(Settings(), seconds_per_image=0.0005) == (cpus, 1)


def test_a_model_faster_than_a_thread_hop_runs_on_the_event_loop_for_at_most_a_millisecond():
    fastest = plan(Settings(), 1, seconds_per_image=0.00003, on_cpu=True)
    assert (fastest.inline_batch, fastest.threads, fastest.workers) == (8, 1, 1)  # 8 x 30 us < 1 ms
    assert plan(Settings(), 1, seconds_per_image=0.00015, on_cpu=True).inline_batch == 6  # 6 x 150 us < 1 ms
    assert plan(Settings(), 1, seconds_per_image=0.0005, on_cpu=True).inline_batch == 0
    assert plan(Settings(), 1, seconds_per_image=0.00003, on_cpu=False).inline_batch == 0


def test_a_slow_model_gets_a_session_with_every_core_for_a_batch_that_is_alone():
    cpus = available_cpus()
    slow = plan(Settings(), processes=cpus, seconds_per_image=0.003, on_cpu=True)
    assert slow.threads == 1 and slow.alone_threads == (cpus if cpus > 1 else 0)
    assert plan(Settings(), 1, seconds_per_image=0.00003, on_cpu=True).alone_threads == 0  # nothing to gain
    assert plan(Settings(intra_op_threads=1), cpus, seconds_per_image=0.003, on_cpu=True).alone_threads == 0


def test_what_the_settings_fix_is_kept_and_the_rest_follows():
    cpus = available_cpus()
    assert threads_and_workers(Settings(intra_op_threads=cpus), seconds_per_image=0.003) == (cpus, 1)
    assert threads_and_workers(Settings(inference_workers=3), seconds_per_image=0.00003) == (max(1, cpus // 3), 3)
    assert threads_and_workers(Settings(intra_op_threads=2, inference_workers=4), seconds_per_image=0.003) == (2, 4)


def test_served_models_got_workers_by_their_measured_speed(client):
    models = client.app.state.services.repository.models
    assert models["lenet5"].batcher.workers == 1
    assert models["efficientnet_lite0"].batcher.workers == available_cpus()


def test_on_an_accelerator_one_worker_runs_batches_at_the_fixed_shapes():
    chosen = plan(Settings(), processes=1, seconds_per_image=0.003, on_cpu=False)
    assert (chosen.workers, chosen.threads, chosen.decode) == (1, 1, "pool")
    assert chosen.shapes == (1, 8, 32) and chosen.max_batch == chosen.pad_to == 32
    assert plan(Settings(), processes=1, seconds_per_image=0.003, on_cpu=True).pad_to is None


def test_models_show_what_sizing_gave_them(client):
    serving = client.get("/models/efficientnet_lite0").json()["serving"]
    assert serving == {
        "processes": 1,
        "cpus": available_cpus(),
        "threads": 1,
        "workers": available_cpus(),
        "decode": "worker",
        "capacity": 32 + 8 * available_cpus(),
        "padded_batch": None,
        "alone_threads": available_cpus() if available_cpus() > 1 else 0,
        "inline_batch": 0,
        "max_batch_size": 8,
        "max_queue": 32,
    }


def test_on_the_cpu_the_service_starts_a_process_per_core_up_to_a_bound():
    assert process_count(Settings(providers="cpu"), accelerated=False) == min(available_cpus(), MAX_AUTO_PROCESSES)
    assert process_count(Settings(providers="cpu", processes=3), accelerated=False) == 3


def test_with_an_accelerator_every_core_but_the_inference_process_decodes():
    assert process_count(Settings(), accelerated=True) == max(1, available_cpus() - 1)
    assert process_count(Settings(gpus=2), accelerated=True) == max(1, available_cpus() - 2)


def test_with_a_cuda_session_per_process_their_count_is_capped():
    per_process = Settings(feed="per-process", max_cuda_processes=1)
    assert process_count(per_process, accelerated=True) == 1
    assert process_count(per_process.model_copy(update={"processes": 8}), accelerated=True) == 1


def test_a_demanded_cuda_counts_as_an_accelerator_so_that_its_refusals_show():
    assert accelerated("cuda")  # on this CPU machine the models are then refused, visibly
    assert not accelerated("cpu")


def test_several_processes_share_the_cores_between_their_threads():
    cpus = available_cpus()
    assert cpu_share(2) == max(1, cpus // 2)
    assert first_guess(Settings(), processes=2) == max(1, cpus // 2)
    assert threads_and_workers(Settings(), seconds_per_image=0.003, processes=cpus) == (1, 1)
    assert cpu_share(4 * cpus) == 1


def test_one_thread_cpu_workers_decode_images_themselves_and_wider_ones_leave_it_to_the_pool(client, repo_copy):
    assert client.app.state.services.repository.models["efficientnet_lite0"].plan.threads == 1
    assert client.app.state.services.repository.models["efficientnet_lite0"].plan.decode == "worker"
    with running_client(Settings(models_dir=repo_copy, intra_op_threads=2)) as wide:
        assert all(model.plan.decode == "pool" for model in wide.app.state.services.repository.models.values())
