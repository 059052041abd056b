"""The names of kdscale's stages, in one place: the CLI, recipes and launchers take them from here."""

# The `kdscale <stage>` commands that run one configured stage (``--config``/``--set``).
STAGE_COMMANDS = ("data", "cache", "prune", "train")

# Every stage `kdscale run` chains, in the only order they can run.
RECIPE_STAGES = ("data", "teacher", "cache", "prune", "train", "baseline", "export", "report")
