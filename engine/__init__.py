"""Sampling engine: schedulers, the PixelDance pipeline, media I/O and the `pdengine` CLI."""
