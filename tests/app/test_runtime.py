"""Execution-provider selection, tested on this CPU machine, and what /models says a model got."""

import pytest

from app.config import MAX_AUTO_PROCESSES, Settings, available_cpus
from app.registry import execution_plan
from app.runtime import CPU, CUDA, ProviderUnavailable, choose_providers, process_count

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


def test_thread_count_defaults_to_the_cpus_available():
    assert Settings().threads == available_cpus() >= 1
    assert Settings(intra_op_threads=1).threads == 1


def test_slow_models_get_a_worker_per_core_and_fast_ones_one_worker_with_every_core():
    cpus = available_cpus()
    assert execution_plan(Settings(), seconds_per_image=0.003) == (1, cpus)
    assert execution_plan(Settings(), seconds_per_image=0.00003) == (cpus, 1)


def test_what_the_settings_fix_is_kept_and_the_rest_follows():
    cpus = available_cpus()
    assert execution_plan(Settings(intra_op_threads=cpus), seconds_per_image=0.003) == (cpus, 1)
    assert execution_plan(Settings(inference_workers=3), seconds_per_image=0.00003) == (max(1, cpus // 3), 3)
    assert execution_plan(Settings(intra_op_threads=2, inference_workers=4), seconds_per_image=0.003) == (2, 4)


def test_served_models_got_workers_by_their_measured_speed(client):
    models = client.app.state.registry.models
    assert models["lenet5"].batcher.workers == 1
    assert models["efficientnet_lite0"].batcher.workers == available_cpus()


def test_on_the_cpu_the_service_starts_a_process_per_core_up_to_a_bound():
    assert process_count(Settings(providers="cpu")) == min(available_cpus(), MAX_AUTO_PROCESSES)
    assert process_count(Settings(providers="cpu", processes=3)) == 3


def test_demanded_cuda_it_cannot_have_starts_one_process_that_refuses_the_models():
    assert process_count(Settings(providers="cuda")) == 1


def test_several_processes_share_the_cores_between_their_threads():
    cpus = available_cpus()
    assert Settings(processes=2).cores == max(1, cpus // 2)
    assert Settings(processes=2).threads == max(1, cpus // 2)
    assert execution_plan(Settings(processes=cpus), seconds_per_image=0.003) == (1, 1)
    assert Settings(processes=4 * cpus).cores == 1


def test_one_thread_cpu_workers_decode_images_themselves_and_wider_ones_leave_it_to_the_pool(client, repo_copy):
    assert client.app.state.registry.models["efficientnet_lite0"].threads == 1
    assert client.app.state.registry.models["efficientnet_lite0"].decodes_on_workers
    with running_client(Settings(models_dir=repo_copy, intra_op_threads=2)) as wide:
        assert not any(model.decodes_on_workers for model in wide.app.state.registry.models.values())
