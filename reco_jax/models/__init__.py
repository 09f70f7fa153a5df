"""DeepLab models, ResNet backbones, resizing and checkpoint conversion.

Import the submodules directly (`from reco_jax.models import deeplab`); this package module
imports nothing so that `import reco_jax.models` stays cheap.
"""
