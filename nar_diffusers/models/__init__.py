from .kv_cache import NARKVCache
from .larp_tokenizer import LARPTokenizer
from .transformer_nar import NARTransformer, NARTransformerOutput
from .video_tokenizer import FrameVQTokenizer, VideoTokenizer, as_video_tokenizer

__all__ = [
    "FrameVQTokenizer",
    "LARPTokenizer",
    "NARKVCache",
    "NARTransformer",
    "NARTransformerOutput",
    "VideoTokenizer",
    "as_video_tokenizer",
]
