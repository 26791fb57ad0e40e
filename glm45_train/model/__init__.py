"""GLM-4.5 itself: config.json -> Megatron config (with refusals), GPTModel build (TE or local spec, meta device),
the released tensor list, make-tiny and its tokenizer, evaluation forwards."""
