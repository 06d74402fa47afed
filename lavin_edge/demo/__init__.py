"""The out-of-the-box demo model: SmolLM2-135M-Instruct + EfficientNet-Lite0 with the LaVIN adapters shipped in
``adapters/``, merged and 4-bit quantized on first use. It sits above ``merge`` and ``quantize`` (it runs them);
chat, serve, bench and the commands call it.

- ``paths``: where a built demo lives, what it is built from (fingerprint, stamp), which one to serve;
- ``build``: ``demo_model_dir`` (find, or build once) and ``build_demo`` (merge + quantize the shipped adapters);
- ``prompts``: held-out easy-vqa test questions to check it with.
"""
