"""Test-wide settings: offline Hugging Face, deterministic torch, a hypothesis profile for CI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="module")
def torch_settings_restored():
    """Put this process's torch thread count and deterministic-algorithms flag back when the module is done
    (the verbs a module runs in-process set both)."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.fixture(scope="module")
def one_thread(torch_settings_restored):
    """Tiny models: a second intra-op thread only adds synchronisation, which on a shared 2-core machine
    costs more than the whole op."""
    torch.set_num_threads(1)
