"""Helpers shared by the test suite: live servers, fake stores and queues, receivers, tiny model builders.

Imported as ``tests.support.<module>`` (the repository root is on ``pythonpath``, see pyproject.toml).
"""
