"""Execution-provider selection, tested on this CPU machine, and what /models says a model got."""

import pytest

from app.config import Settings, available_cpus
from app.runtime import CPU, CUDA, ProviderUnavailable, choose_providers

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
