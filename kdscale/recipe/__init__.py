"""`kdscale run`: recipes that chain the stages (plan, stages, lineage, report, runner)."""
