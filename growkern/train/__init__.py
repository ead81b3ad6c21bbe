"""The harness around the library: growkern's TinyStories training loop (loop.py), its
data (data.py), torchrun/DDP/FSDP2 setup (distributed.py), exact full-state checkpoints
(checkpoint.py, written atomically through staging.py) and offline growth of a
distributed checkpoint (offline.py)."""
