"""sa-peft: Selective Amnesia concept erasure shipped as a "forget" LoRA for diffusers pipelines."""

__version__ = "0.1.0"

from .models import load_pipeline, resolve_model_path

__all__ = ["__version__", "load_pipeline", "resolve_model_path"]
