"""Teacher-logit cache: codec, manifest, atomic shard writer, Ray runner, reader.

Only the in-memory target type is imported here (``kdscale.cache.SparseTargets``), so that the
loss, which needs nothing else of this package, loads nothing else; import the rest from its
module (``kdscale.cache.reader``, ``.codec``, ``.runner``, ...).
"""

from kdscale.cache.targets import SparseTargets

__all__ = ["SparseTargets"]
