"""PyTorch model of LaVIN: routed adapters, the LLaMA decoder, the vision towers and their assembly."""
