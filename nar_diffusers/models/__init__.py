from .kv_cache import NARKVCache
from .larp_tokenizer import LARPTokenizer
from .transformer_nar import NARTransformer, NARTransformerOutput

__all__ = ["LARPTokenizer", "NARKVCache", "NARTransformer", "NARTransformerOutput"]
