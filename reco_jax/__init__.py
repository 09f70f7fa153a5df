"""reco_jax: ReCo regional contrast and label-based pixel contrastive learning in JAX/Flax."""
