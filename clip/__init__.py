"""OpenAI-compatible CLIP: the same weights, tokens and features, in our own small code."""
from . import model
from .clip import MEAN, MODELS, STD, CheckpointError, available_models, load, tokenize, trim
from .model import build_model, tiny_clip

__all__ = ["available_models", "load", "tokenize", "trim", "build_model", "tiny_clip", "model", "MODELS", "MEAN", "STD", "CheckpointError"]
