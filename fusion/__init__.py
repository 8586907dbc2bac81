"""fusion: classify urban functional zones from a remote-sensing tile and an activity series."""

__version__ = "0.1.0"
