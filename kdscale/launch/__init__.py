"""Launchers: render and submit SLURM batch jobs (:mod:`.slurm`), submit Ray jobs (:mod:`.ray_jobs`).

``kdscale submit`` (:mod:`.submit`) ties them to a validated recipe. The sbatch templates are
package data in ``kdscale/launch_templates``.
"""
