"""Novita's v3 wire format, shared by the HTTP layer (``api/``), webhooks (``delivery/``) and workers.

``errors``: the ``{code, reason, message, metadata}`` error body; ``result``: the task-result body (also the
webhook payload); ``images``: decoding and checking a request's base64 images. Nothing here knows HTTP routing,
the task store's backends or torch.
"""
