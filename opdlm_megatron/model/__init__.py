"""The student and teacher models on megatron-core: attention layouts and masks, FlexAttention, the GPTModel build, vocabulary-parallel helpers, divergences, micro-batches."""
