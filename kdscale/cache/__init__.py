"""Teacher-logit cache: codec, manifest, atomic shard writer, Ray runner, reader."""

from kdscale.cache.targets import SparseTargets

__all__ = ["SparseTargets"]
