"""Shared fixtures: offline, one torch thread, tiny models of every family built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from vlm_probe.testbed.zoo import FAMILIES, TinyVLM, tiny_vlm  # noqa: E402


class Zoo:
    """Tiny models built on first use and shared by every test of the session."""

    def __init__(self) -> None:
        self._cache: dict[tuple, TinyVLM] = {}

    def __call__(self, family: str, seed: int = 0, **sizes) -> TinyVLM:
        key = (family, seed, tuple(sorted(sizes.items())))
        if key not in self._cache:
            self._cache[key] = tiny_vlm(family, seed=seed, **sizes)
        return self._cache[key]


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def qwen(zoo):
    """The default family's tiny model wrapped for tracing."""
    import vlm_probe

    return vlm_probe.load(zoo("qwen2_5_vl"))
