"""lmpack: build, bundle, serve and keep healthy language models on your own hardware."""

__version__ = "0.1.0"
