"""``integrity`` section: what kdscale verifies before it trusts a directory it did not just write."""

from pydantic import Field

from kdscale.config.base import RUNTIME, Section


class IntegrityConfig(Section):
    """Checks on inputs that cost reading them in full (``integrity``).

    Token samples are always checked against their content keys and cache members carry their
    own checksums; checkpoint and model directories are hashed against the ``checksums.json``
    written when they were saved, before every load (resume, ``train.init``, prune, the
    megatron teacher, DeepSpeed, and the report's evaluations).
    """

    verify_checksums: bool = Field(
        True,
        description="Hash every file of a checkpoint or model directory against its "
        "checksums.json before loading it (one line names a damaged, missing or added file). "
        "false loads it unverified: only for directories checked some other way.",
        json_schema_extra=RUNTIME,
    )
