"""Teacher-logit cache: codec, manifest, atomic shard writer, Ray runner, reader."""

from kdscale.cache.codec import codec_fingerprint, codec_params, decode, encode
from kdscale.cache.fidelity import fidelity, support_kl
from kdscale.cache.reader import Cache, open_cache
from kdscale.cache.sparsify import concat_positions, sparsify
from kdscale.cache.targets import SparseTargets

__all__ = [
    "Cache",
    "SparseTargets",
    "codec_fingerprint",
    "codec_params",
    "concat_positions",
    "decode",
    "encode",
    "fidelity",
    "open_cache",
    "sparsify",
    "support_kl",
]
