"""Model engines: `text` (our multi-LoRA LLM engine) and `image` (diffusers)."""
