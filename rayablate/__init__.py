"""rayablate: remove concepts from Stable Diffusion models, distributed on Ray."""

__version__ = "0.1.0"
