from .kv_cache import NARKVCache
from .transformer_nar import NARTransformer, NARTransformerOutput
from .video_tokenizer import FrameVQTokenizer, VideoTokenizer, as_video_tokenizer

__all__ = ["FrameVQTokenizer", "NARKVCache", "NARTransformer", "NARTransformerOutput", "VideoTokenizer", "as_video_tokenizer"]
