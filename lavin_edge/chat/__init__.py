"""Chat, the user-facing side of serving: sampling (``sampling``), multi-turn sessions (``session``), the
interactive loop (``repl``) and the packaged demo model's location (``demo``). The engine they drive is
``lavin_edge.runtime``."""
