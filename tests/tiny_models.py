"""Tiny configs and models of every supported family (2 layers, hidden 64), built offline."""


def tiny_config(family: str, **overrides):
    """A 2-layer, hidden-64 config of `family` (llama, mistral, qwen2, qwen3, gpt2, bert) built offline."""
    import transformers as tf

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        cls = {
            "llama": tf.LlamaConfig,
            "mistral": tf.MistralConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
        }
        extra = dict(
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2
        )
        if family == "qwen3":
            extra["head_dim"] = 16
        if family == "mistral":
            extra["sliding_window"] = None
        config = cls[family](**common, **extra)
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=96,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    elif family == "bert":
        config = tf.BertConfig(**common, max_position_embeddings=256, pad_token_id=0)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, attn_implementation: str = "sdpa", **overrides):
    """A randomly initialized tiny model of `family` in eval mode (a causal LM, or `BertModel`)."""
    from transformers import AutoModel, AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=attn_implementation).eval()
