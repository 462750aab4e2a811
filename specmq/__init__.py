"""specmq: distributed speculative decoding over a message queue."""
__version__ = "0.1.0"
