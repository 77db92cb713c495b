"""tokenloom: LLM inference and serving engine."""

from tokenloom.adapters import AdapterRequest
from tokenloom.adapters.train import train
from tokenloom.config import EngineConfig
from tokenloom.llm import LLM
from tokenloom.manager import ModelManager, ModelSpec
from tokenloom.outputs import CompletionOutput, RequestOutput
from tokenloom.pipelines import load_pipeline, pipeline
from tokenloom.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "ModelManager", "ModelSpec", "EngineConfig", "SamplingParams", "StructuredOutputsParams",
           "BeamSearchParams", "RequestOutput", "CompletionOutput", "AdapterRequest", "pipeline", "load_pipeline",
           "train"]
__version__ = "0.1.0"
