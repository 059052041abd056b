"""``train.engine: deepspeed``: the student as a transformers causal LM under DeepSpeed ZeRO.

For a student that fits without tensor or pipeline parallelism: data parallel over every rank
(gloo on CPU), ZeRO stage 1, 2 or 3, fp32 or bf16. Only the engine differs from the megatron
one: the data order and resume position (:mod:`kdscale.train.loader`), the objective
(``kd_lm_loss`` per token, normalised by the global batch's tokens), the LR schedule, the
metrics and the loop (:mod:`kdscale.train.loop`) are shared.

    start.py       where the weights and the architecture come from; the transformers model
    checks.py      the deepspeed-only checks, then the shared ``check_run``
    setup.py       the DeepSpeed config, the torch AdamW and its LR schedule
    objective.py   one micro-batch: forward, ``kd_lm_loss``, token sums
    checkpoint.py  DeepSpeed checkpoints in kdscale's layout (atomic, with train_state.json)
    export.py      the trained model as a Hugging Face directory (full weights gathered)
    engine.py      ``DeepSpeedEngine``, the engine the shared loop drives
"""
