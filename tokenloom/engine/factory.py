"""Pick the engine a model needs: LLMEngine for generative models, PoolingEngine for encoder-only ones."""

from __future__ import annotations

import torch

from tokenloom.config import EngineConfig
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.pooling_engine import PoolingEngine
from tokenloom.loader import LoadedModel, load_model

GENERATIVE_TASKS = ("generate", "chat")


def create_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine | PoolingEngine:
    """Load the model (unless given) and wrap it in the engine its architecture runs on."""
    if loaded is None:
        if config.device_config.num_threads:
            torch.set_num_threads(config.device_config.num_threads)
        loaded = load_model(config.model_config, config.device_config.torch_device())
    if loaded.kind == "encoder":
        return PoolingEngine(config, loaded)
    return LLMEngine(config, loaded)


def supported_tasks(engine: LLMEngine | PoolingEngine) -> tuple[str, ...]:
    """What an engine's model can serve: generate/chat, or some of embed, classify, score,
    token_classify, qa, fill_mask."""
    return engine.supported_tasks if isinstance(engine, PoolingEngine) else GENERATIVE_TASKS
