"""Inference: token ids in, token ids out. `Engine(model).generate(prompts, SamplingParams(...))`."""

from glassmind.infer.detok import Detokenizer
from glassmind.infer.batch import Session
from glassmind.infer.engine import Engine, GenerationResult, MaskPrediction, Metrics, StreamEvent
from glassmind.infer.kv_cache import KVCache
from glassmind.infer.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "GenerationResult", "StreamEvent", "Metrics", "MaskPrediction",
           "Detokenizer", "KVCache", "Session"]
