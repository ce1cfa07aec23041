"""Loading models and processors from local paths, and building the tiny Qwen3-VL of the embedded default."""
