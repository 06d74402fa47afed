"""Training LaVIN's adapters on a frozen base: the loop (``loop.train``) and its pieces, one job each: settings
(``config``, ``recipe``), the base model (``base``), losses (``losses``), model preparation (``prepare``), what
each step reads (``plan``), run state and RNG (``state``), saving (``save``, ``checkpoint``, ``rundir``), the
final evaluation (``final_eval``), the schedule (``schedule``), DDP (``distributed``) and the loss plot (``plot``)."""
