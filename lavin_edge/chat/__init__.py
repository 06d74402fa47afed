"""Chat, the user-facing side of serving: multi-turn sessions (``session``), the interactive loop (``repl``) and
the one-shot answer on the engine without PyTorch (``oneshot``). The engine, sampler and text streaming they drive
are ``lavin_edge.runtime``; the packaged demo model is ``lavin_edge.demo``."""
