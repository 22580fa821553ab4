"""The console scripts, one module each: argument parsing and the one refusal path only, importable
without torch (``--help`` answers at once); each ``main`` imports the stage it runs after parsing.

| console script | module | runs |
| --- | --- | --- |
| ``opdlm-train`` | ``train`` | ``trainer.Trainer`` |
| ``opdlm-generate`` | ``generate`` | the rollout engine on a prompts file |
| ``opdlm-eval`` | ``evaluate`` | ``evaluate`` (tasks, decoding settings, teacher agreement) |
| ``opdlm-lm-eval`` | ``lm_eval`` | lm-evaluation-harness with ``eval.lm_eval_model`` |
| ``opdlm-plan`` | ``plan`` | ``plan`` (layout checks, memory per GPU) |
| ``opdlm-convert-hf-to-megatron`` | ``convert_hf_to_megatron`` | ``tools.convert_hf_to_megatron.convert`` |
| ``opdlm-convert-megatron-to-hf`` | ``convert_megatron_to_hf`` | ``tools.convert_megatron_to_hf.export`` |
| ``opdlm-convert-layout`` | ``convert_layout`` | ``tools.convert_layout.convert_layout`` |
| ``opdlm-prepare-smollm2`` | ``prepare_smollm2`` | ``tools.prepare_smollm2`` |
| ``opdlm-pretrain-megatron-lm`` | ``pretrain_megatron_lm`` | ``megatron_lm.run`` |
"""
