"""vitpipe: pre-train Vision Transformers on sharded images, fine-tune, export to ONNX, benchmark."""

__version__ = "0.1.0"
