"""compressed-tensors backend: a Hugging Face checkpoint in the layout llm-compressor writes and vLLM loads."""
