"""ltc-ray: face (and any embedding) clustering at scale as a batch job on Ray."""

__version__ = "0.1.0"
