"""The two tiny random T5 configurations the decoding tests share (a T5 v1.0 and a flan-style shape)."""

VOCAB = 97

CONFIGS = {
    # T5 v1.0 style: tied embeddings (decoder output scaled by d_model**-0.5), ReLU FF, equal depths.
    "v1.0-tied-3+3": dict(num_layers=3, num_decoder_layers=3, tie_word_embeddings=True, feed_forward_proj="relu",
                          seed=2),
    # T5 v1.1 / flan style: untied head, gated-GELU FF, shallower encoder than decoder (stock generate needs a
    # decoder-sized cache for it).
    "v1.1-untied-2+4": dict(num_layers=2, num_decoder_layers=4, tie_word_embeddings=False,
                            feed_forward_proj="gated-gelu", seed=1),
}


def random_t5(seed: int = 0, initializer_factor: float = 1.0):
    """A random 2+3-layer T5 (vocabulary 64, d_model 16) in eval mode: the model of the calibration and file tests.

    ``initializer_factor`` > 1 gives larger weights, hence more spread-out logits and confidences.
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2,
                   decoder_start_token_id=0, initializer_factor=initializer_factor)
    return T5ForConditionalGeneration(cfg).eval()
