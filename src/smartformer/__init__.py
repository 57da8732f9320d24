"""smartformer: SMART self-supervised pretraining of 3D Swin transformers on CT."""

__version__ = "0.1.0"
