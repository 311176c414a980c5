"""Scale-out mode: Celery workers on any number of machines, stateless API nodes, a shared store and image store.

Import the submodules you need; this package imports nothing heavy (``celery`` is only needed by
``celery_app``, ``celery_queue``, ``broker`` and ``worker``).
"""
