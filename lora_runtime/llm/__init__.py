"""Real LLMs: import (GGUF, Hugging Face folders), chat template and tokenizer, generation, calibration data."""

from lora_runtime.llm.calibration import CALIBRATION_PROMPTS, calibration_data
from lora_runtime.llm.chat import Chat
from lora_runtime.llm.generate import GREEDY_PROMPTS, Generation, PromptCache, generate, greedy_runs, open_llm
from lora_runtime.llm.importer import SMOLLM2, SMOLLM2_INSTALL, find_smollm2, import_gguf, import_hf, import_model

__all__ = ["CALIBRATION_PROMPTS", "GREEDY_PROMPTS", "SMOLLM2", "SMOLLM2_INSTALL", "Chat", "Generation",
           "PromptCache",
           "calibration_data", "find_smollm2", "generate", "greedy_runs", "import_gguf", "import_hf", "import_model",
           "open_llm"]
