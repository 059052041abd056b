"""``loss`` section: the sparse KD + LM objective (``kdscale.losses.kd_lm_loss`` and
``head_kd_lm_loss``).

The per-token total is ``α·T²·D(teacher, student) + (1 − α)·CE(label)``; α follows ``schedule``.
"""

from typing import Literal

from pydantic import Field, model_validator

from kdscale.config.base import RUNTIME, InvalidKey, Section

# Measured on SmolLM2-135M → an 8-layer pruned student (README, "The KD loss").
RENORM_COLLAPSE_NOTE = (
    "renorm is blind to the student's mass outside the teacher's support, so with no LM term "
    "the student collapses (measured: held-out CE 9.05 nats vs 5.34 with the tail bucket)"
)


class KDWeightSchedule(Section):
    """How α (``loss.kd_weight``) moves over training, as a fraction of the run's steps.

    ``constant``: α = kd_weight throughout. ``linear``: from ``start`` at step 0 to kd_weight at
    the last step. ``wsd`` (warmup-stable-decay): from ``start`` to kd_weight over the first
    ``warmup_fraction`` of steps, kd_weight until the last ``decay_fraction``, then down to ``end``.
    """

    kind: Literal["constant", "linear", "wsd"] = Field(
        "constant", description="constant | linear | wsd (warmup-stable-decay)."
    )
    start: float = Field(0.0, ge=0.0, le=1.0, description="α at step 0 (linear, wsd).")
    end: float = Field(0.0, ge=0.0, le=1.0, description="α at the last step (wsd).")
    warmup_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of steps spent going start → kd_weight (wsd)."
    )
    decay_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of steps spent going kd_weight → end (wsd)."
    )

    @model_validator(mode="after")
    def _fractions_fit(self) -> "KDWeightSchedule":
        if self.warmup_fraction + self.decay_fraction > 1.0:
            raise InvalidKey(
                "decay_fraction",
                self.decay_fraction,
                f"loss.schedule.warmup_fraction + decay_fraction = "
                f"{self.warmup_fraction + self.decay_fraction} exceeds 1; lower one of them",
            )
        return self


class KDLossConfig(Section):
    """The KD objective on sparse cached teacher targets. See DESIGN.md "Loss"."""

    divergence: Literal["fkl", "rkl", "jsd", "tvd"] = Field(
        "fkl",
        description="fkl = KL(teacher‖student), rkl = KL(student‖teacher), jsd = generalised "
        "Jensen-Shannon with jsd_beta, tvd = total variation; all on the teacher's support buckets.",
    )
    jsd_beta: float = Field(
        0.5, gt=0.0, lt=1.0, description="β of JSD: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q."
    )
    missing_mass: Literal["tail", "renorm", "zero"] = Field(
        "tail",
        description="tail: the teacher's mass outside its support is one extra bucket matched "
        "against the student's mass outside it; renorm: both renormalised over the support; "
        "zero: student over the full vocab, the tail is ignored.",
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="Student logits are divided by T and the KD term scaled by T²; must equal "
        "the cache's temperature unless allow_temperature_mismatch.",
    )
    allow_temperature_mismatch: bool = Field(
        False, description="Accept a cache written at another temperature than loss.temperature."
    )
    kd_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="α in α·KD + (1−α)·LM (the constant value; the target of linear/wsd).",
    )
    schedule: KDWeightSchedule = Field(
        default_factory=KDWeightSchedule, description="How α changes over training."
    )
    allow_renorm_without_lm: bool = Field(
        False, description="Permit missing_mass='renorm' with α reaching 1 (no LM term)."
    )
    validate_every: int = Field(
        100,
        ge=0,
        description="Check the loss inputs (ids and labels in range, ids distinct, finite loss, "
        "some unmasked token) at the first step and then every N steps (0: never); each check "
        "costs one device→host sync.",
        json_schema_extra=RUNTIME,
    )
    overwrite_logits: bool = Field(
        True,
        description="Reuse the logits' storage, as megatron's vocab_parallel_cross_entropy does "
        "(contiguous non-leaf, non-view logits only): at T=1 float32 logits are overwritten by "
        "exp(z - max) in forward, else they receive their gradient in backward. Do not read the "
        "logits after the loss when on.",
    )
    fused_head: bool = Field(
        True,
        description="Training and evaluation compute the output layer inside the loss "
        "(head_kd_lm_loss): the [tokens, V/TP] logits never exist whole, for the same values as "
        "the output layer followed by kd_lm_loss (or the LM cross-entropy without a cache) up "
        "to float rounding. False: the output layer's logits, then the loss.",
    )
    chunk_elements: int = Field(
        1 << 21,
        ge=1,
        description="Elements of the [rows, columns] logit blocks processed at once: bounds the "
        "temporaries of the vocab passes. kd_lm_loss takes token rows × local vocab; "
        "head_kd_lm_loss takes all tokens × chunk_elements/tokens vocab columns (at least 64), "
        "so larger values give its matmuls more columns.",
    )

    def max_kd_weight(self) -> float:
        """The largest α the schedule reaches (its knots: start, kd_weight, end)."""
        knots = {
            "constant": [self.kd_weight],
            "linear": [self.schedule.start, self.kd_weight],
            "wsd": [self.schedule.start, self.kd_weight, self.schedule.end],
        }[self.schedule.kind]
        return max(knots)

    @model_validator(mode="after")
    def _renorm_needs_lm(self) -> "KDLossConfig":
        if (
            self.missing_mass == "renorm"
            and self.max_kd_weight() >= 1.0
            and not self.allow_renorm_without_lm
        ):
            raise InvalidKey(
                "missing_mass",
                self.missing_mass,
                f"needs an LM term, but loss.kd_weight reaches {self.max_kd_weight()}: "
                f"{RENORM_COLLAPSE_NOTE}; set loss.missing_mass=tail, keep loss.kd_weight (and "
                "loss.schedule.start/end) below 1, or set loss.allow_renorm_without_lm=true",
            )
        return self
