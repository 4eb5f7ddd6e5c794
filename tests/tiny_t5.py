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
