"""Underpaint: a self-hosted, Novita v3 compatible img2img service."""

__version__ = "0.1.0"
