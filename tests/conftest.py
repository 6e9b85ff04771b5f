import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# derived models (the toy SD with a memorized image) are made in a folder of this run, not in ~/.cache
if "RAYABLATE_CACHE" not in os.environ:
    import tempfile

    os.environ["RAYABLATE_CACHE"] = tempfile.mkdtemp(prefix="rayablate-cache-")

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


# --- tiny real-architecture fixtures (rayablate/toyworld/tiny.py), built from configs, no download ---

@pytest.fixture(scope="session")
def sd1_path(tmp_path_factory):
    """SD-1.x: StableDiffusionPipeline, epsilon, the full 49,408-token CLIP tokenizer (77 positions)."""
    from rayablate.toyworld.tiny import save_sd1_pipeline

    return save_sd1_pipeline(tmp_path_factory.mktemp("sd1") / "sd1", seed=0)


@pytest.fixture(scope="session")
def sd2_path(tmp_path_factory):
    """SD-2.x style: v_prediction, linear projections, a tokenizer padding with "!"."""
    from rayablate.toyworld.tiny import save_sd2_pipeline

    return save_sd2_pipeline(tmp_path_factory.mktemp("sd2") / "sd2", seed=0)


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory):
    """SDXL: two text encoders (the second with projection), text_time conditioning, Euler."""
    from rayablate.toyworld.tiny import save_sdxl_pipeline

    return save_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def vit_b32_clip_path(tmp_path_factory):
    """open_clip's ViT-B-32 architecture (224 px, 32 px patches, 77 tokens, 49,408-token vocabulary)
    with random weights, narrowed to width 64 / 2 layers / text width 32 (the full 151 M parameters
    take ~20 s to build and ~5 s per process to load: tests/test_families.py checks that size once)."""
    from rayablate.toyworld.tiny import save_vit_b32_clip

    return save_vit_b32_clip(tmp_path_factory.mktemp("vit-b-32") / "clip", seed=0, width=64, layers=2, text_width=32)
