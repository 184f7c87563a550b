from .lora_pipeline import NARLoraLoaderMixin

__all__ = ["NARLoraLoaderMixin"]
