"""Datasets as TFDS builders; importing this package registers them.

reco_voc, reco_cityscapes, reco_sun_rgbd and reco_folder build from raw files in a manual dir
(see each module's docstring); reco_toy is generated. Build or load one with
`reco_jax.data.base.prepare(name, data_dir, manual_dir)`.
"""
from reco_jax.data import cityscapes
from reco_jax.data import folder
from reco_jax.data import sun_rgbd
from reco_jax.data import toy
from reco_jax.data import voc

BUILDER_NAMES = ('reco_voc', 'reco_cityscapes', 'reco_sun_rgbd', 'reco_folder', 'reco_toy')
