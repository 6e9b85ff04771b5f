import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random StableDiffusionPipeline built from configs and saved as a diffusers folder."""
    from rayablate.toyworld.tiny import save_random_pipeline

    return save_random_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)


@pytest.fixture
def tiny_pipe(tiny_sd_path):
    """A fresh copy of the tiny pipeline, loaded back through `from_pretrained`."""
    from rayablate.pipeline import load_pipeline

    return load_pipeline(tiny_sd_path)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A toy-CLIP folder with random weights."""
    from rayablate.toyworld.tiny import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", seed=0)
