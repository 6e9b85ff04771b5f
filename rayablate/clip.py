"""open_clip scoring: embeddings, CLIP masks, CLIP accuracy and CLIP score.

The same class serves a real open_clip model ("ViT-B-32/openai", "ViT-L-14/openai") and the
bundled toy CLIP (a folder with `open_clip_config.json`, `open_clip_model.safetensors` and a
`tokenizer/`). Weights load from safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .images import as_float_nchw


class ClipLoadError(ValueError):
    """The CLIP name or folder cannot be loaded."""


class ClipScorer:
    def __init__(self, model, tokenize: Callable[[list[str]], torch.Tensor], image_size: int,
                 mean: Sequence[float], std: Sequence[float], device: str = "cpu"):
        self.model = model.eval().to(device)
        self.tokenize = tokenize
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device = device

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str | Path, device: str = "cpu") -> "ClipScorer":
        """A toy-CLIP folder, or an open_clip "ARCH/PRETRAINED" name (downloads when online)."""
        import open_clip

        path = Path(name)
        if path.is_dir():
            cfg_file, weights = path / "open_clip_config.json", path / "open_clip_model.safetensors"
            if not cfg_file.exists() or not weights.exists():
                raise ClipLoadError(f"{path} is not an open_clip folder (needs open_clip_config.json and "
                                    "open_clip_model.safetensors)")
            from safetensors.torch import load_file
            from transformers import CLIPTokenizer

            cfg = json.loads(cfg_file.read_text())
            model = open_clip.CLIP(**cfg)
            model.load_state_dict(load_file(str(weights)))
            tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
            ctx = cfg["text_cfg"]["context_length"]

            def tokenize(texts: list[str]) -> torch.Tensor:
                return tok(list(texts), padding="max_length", max_length=ctx, truncation=True,
                           return_tensors="pt").input_ids

            return cls(model, tokenize, cfg["vision_cfg"]["image_size"], open_clip.OPENAI_DATASET_MEAN,
                       open_clip.OPENAI_DATASET_STD, device)
        if "/" not in str(name):
            raise ClipLoadError(f"CLIP {name!r}: expected a toy-CLIP folder or an open_clip 'ARCH/PRETRAINED' name")
        arch, tag = str(name).split("/", 1)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)
        except Exception as e:  # open_clip raises RuntimeError / OSError / HF errors for unknown or offline names
            raise ClipLoadError(f"could not load open_clip model {name!r}: {e}") from e
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        return cls(model, open_clip.get_tokenizer(arch), size, mean, std, device)

    # --- embeddings ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenize(list(texts[i:i + batch])).to(self.device))
               for i in range(0, len(texts), batch)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images, batch: int = 256) -> torch.Tensor:
        """uint8 NxHxWx3 arrays or float Nx3xHxW tensors in [0, 1]."""
        x = as_float_nchw(images).to(self.device)
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            if xb.shape[-1] != self.image_size or xb.shape[-2] != self.image_size:
                xb = F.interpolate(xb, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
            out.append(self.model.encode_image((xb.clamp(0, 1) - self.mean) / self.std))
        return F.normalize(torch.cat(out).float(), dim=-1)

    # --- masks and metrics -----------------------------------------------------------------
    def concept_embedding(self, concept_texts: Sequence[str]) -> torch.Tensor:
        """The concept as one direction: the normalised mean of its texts' embeddings (a prompt ensemble)."""
        return F.normalize(self.encode_text(concept_texts).mean(0), dim=-1)

    def concept_similarity(self, captions: Sequence[str], concept_texts: Sequence[str]) -> np.ndarray:
        """Per caption: cosine similarity to the concept's prompt-ensemble embedding."""
        if not len(captions):
            return np.zeros(0, dtype=np.float32)
        return (self.encode_text(captions) @ self.concept_embedding(concept_texts)).cpu().numpy()

    def row_similarity(self, captions: Sequence[str], concept_texts: Sequence[str], images=None,
                       image_weight: float = 0.0) -> np.ndarray:
        """The CLIP-mask score of each row: cos(caption [, image], concept); the mask is score > threshold."""
        sim = self.concept_similarity(captions, concept_texts)
        if images is not None and image_weight > 0:
            img_sim = (self.encode_images(images) @ self.concept_embedding(concept_texts)).cpu().numpy()
            sim = (1 - image_weight) * sim + image_weight * img_sim
        return sim

    def clip_accuracy(self, images, target_texts: Sequence[str], anchor_texts: Sequence[str]) -> float:
        """Share of images CLIP ranks closer to the target than to the anchor (the paper's CLIP accuracy)."""
        if not len(images):
            return float("nan")
        emb = self.encode_images(images)
        t, a = self.concept_embedding(target_texts), self.concept_embedding(anchor_texts)
        return float(((emb @ t) > (emb @ a)).float().mean())

    def clip_score(self, images, prompts: Sequence[str]) -> float:
        """Mean of 100 * max(cos(image, its prompt), 0)."""
        if not len(images):
            return float("nan")
        sim = (self.encode_images(images) * self.encode_text(prompts)).sum(-1)
        return float((100 * sim.clamp_min(0)).mean())

    def zero_shot(self, images, class_texts: Sequence[Sequence[str]]) -> np.ndarray:
        """Class index per image; each class is a list of prompts whose embeddings are averaged."""
        cls = torch.stack([self.concept_embedding(list(t)) for t in class_texts])
        return (self.encode_images(images) @ cls.T).argmax(1).cpu().numpy()
