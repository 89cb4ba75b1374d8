"""What a trained run becomes: the merged 16-bit model (merging.py: which base, the room, one merge
sequence) and GGUF for llama.cpp and Ollama (gguf_export.py). It never imports evaluate, the
lifecycle or the CLI."""
