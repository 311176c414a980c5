"""The shared database: one engine setup (``engine``), every table (``schema``), one migration chain
(``migrations``). The task store, the webhook outbox and the worker heartbeats all live in it."""
