"""GPTQ 4-bit quantization of the merged model's LLM linears (see docs/quantization.md)."""
