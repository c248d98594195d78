"""compress: a recipe-driven model compression and export toolchain with an accuracy-vs-latency gate."""

__version__ = "0.1.0"
