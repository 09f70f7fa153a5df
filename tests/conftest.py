"""Shared test setup: several simulated CPU devices, set before any device use."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)
jax.config.update('jax_threefry_partitionable', True)
