from .kv_cache import NARKVCache
from .transformer_nar import NARTransformer, NARTransformerOutput

__all__ = ["NARKVCache", "NARTransformer", "NARTransformerOutput"]
