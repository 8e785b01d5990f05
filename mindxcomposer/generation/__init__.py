"""Decoding strategies with transformers 4.33 semantics, over any model exposing a `DecoderSession`.

Pure numpy on the host: greedy, sampling (temperature / top-k / top-p), beam search and beam sampling,
repetition penalty, min/max lengths, eos lists, stop words and streamers.
"""
from .beam_search import BeamHypotheses, BeamSearchScorer
from .config import GenerationConfig
from .generate import DecoderSession, generate
from .logits_process import (LogitsProcessor, LogitsProcessorList, MinLengthLogitsProcessor,
                             MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                             TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, build_logits_processor,
                             build_logits_warper, log_softmax, softmax)
from .stopping_criteria import MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList, StopWordsCriteria
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer

__all__ = [
    "BaseStreamer", "BeamHypotheses", "BeamSearchScorer", "DecoderSession", "GenerationConfig", "LogitsProcessor",
    "LogitsProcessorList", "MaxLengthCriteria", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor", "StopWordsCriteria", "StoppingCriteria", "StoppingCriteriaList",
    "TemperatureLogitsWarper", "TextIteratorStreamer", "TextStreamer", "TopKLogitsWarper", "TopPLogitsWarper",
    "build_logits_processor", "build_logits_warper", "generate", "log_softmax", "softmax",
]
