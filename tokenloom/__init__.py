from tokenloom.config import EngineConfig
from tokenloom.outputs import CompletionOutput, RequestOutput
from tokenloom.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["EngineConfig", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
