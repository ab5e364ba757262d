"""The flowsk version, written into model files and read by setup.cfg."""
__version__ = "0.1.0"
