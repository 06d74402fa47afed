"""Serving: the runtime engine (``engine``), sampling (``sampling``), multi-turn sessions (``session``), the
interactive loop (``repl``) and the packaged demo model's location (``demo``)."""
