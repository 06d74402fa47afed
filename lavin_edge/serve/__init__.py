"""`lavin-edge serve`: an OpenAI-compatible chat-completions server with continuous batching and a web page.

- ``errors``: ``APIError``, the OpenAI error JSON shape;
- ``images``: ``image_url`` values -> preprocessed images (data URLs; files only under ``--allow-files``);
- ``protocol``: a request body -> a validated ``Completion`` (prompt ids in chat's format, sampling settings);
- ``scheduler``: the batching loop (slots, bounded queue, one batched decode step for all active rows);
- ``app``: the Starlette application (routes, auth, server-sent events, the page in ``static/``).
"""
