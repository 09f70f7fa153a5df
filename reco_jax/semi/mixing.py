"""CutOut, CutMix and ClassMix on pseudo-labelled batches (reference ReCo).

Every sample i is mixed with sample (i + 1) % B of the same (global) batch:

* cutout: a box of about half the image area is cut from sample i: its image
  pixels are set to 0 (the normalised mean colour), its labels to void and its
  confidence to 0. No partner is used.
* cutmix: the pixels inside a box of about half the image area come from
  sample i + 1 (image, label and confidence alike); the rest from sample i.
* classmix: floor(n / 2) of the n classes present in sample i's pseudo-label,
  chosen uniformly at random, are pasted from sample i over sample i + 1:
  pixels of those classes in sample i come from sample i, all others from
  sample i + 1.

The box follows the reference `generate_cutout_mask`: width w uniform in
[W // 2 + 1, W - 1], height h = round(H * W / 2 / w) (half to even), top-left
corner uniform over the positions that keep the box inside the image.
"""
import jax
import jax.numpy as jnp

MODES = ('cutout', 'cutmix', 'classmix')


def box_mask(key, batch, height, width):
  """Per-sample half-area boxes.

  Args:
    key: typed PRNG key.
    batch: B.
    height: H.
    width: W (>= 3, so that the width range is not empty).

  Returns:
    [B, H, W] bool, True inside each sample's box.
  """
  if width < 3 or height < 1:
    raise ValueError(
        f'box_mask: the box needs an image at least 1x3 (H x W), got '
        f'{height}x{width}.')
  kw, kx, ky = jax.random.split(key, 3)
  w = jax.random.randint(kw, (batch,), width // 2 + 1, width)
  h = jnp.round(height * width / 2 / w.astype(jnp.float32)).astype(jnp.int32)
  x0 = jax.random.randint(kx, (batch,), 0, width - w + 1)
  y0 = jax.random.randint(ky, (batch,), 0, height - h + 1)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside_rows = (rows >= y0[:, None, None]) & (rows < (y0 + h)[:, None, None])
  inside_cols = (cols >= x0[:, None, None]) & (cols < (x0 + w)[:, None, None])
  return inside_rows & inside_cols


def unimatch_box_mask(key, batch, height, width, *, prob=0.5, area=(0.02, 0.4),
                      aspect=(0.3, 1 / 0.3), max_tries=100):
  """UniMatch's CutMix boxes (the authors' `obtain_cutmix_box`), one per sample.

  With probability `prob` a sample gets a box: its area is a fraction of H * W uniform in
  `area`; then an aspect ratio r uniform in `aspect`, width int(sqrt(area / r)), height
  int(sqrt(area * r)) and a top-left corner uniform over the image are drawn together until
  the box lies inside the image (rejection sampling, as the authors; after `max_tries`
  rejected draws, far more than the few a box that can fit needs, the sample gets no box).

  Args:
    key: typed PRNG key.
    batch, height, width: B, H, W (static).

  Returns:
    [B, H, W] bool, True inside each sample's box (all False without one).
  """
  def one(k):
    k_on, k_area, k_try = jax.random.split(k, 3)
    size = jax.random.uniform(k_area, (), minval=area[0], maxval=area[1]) * height * width

    def draw(i):
      kr, kx, ky = jax.random.split(jax.random.fold_in(k_try, i), 3)
      ratio = jax.random.uniform(kr, (), minval=aspect[0], maxval=aspect[1])
      w = jnp.floor(jnp.sqrt(size / ratio)).astype(jnp.int32)
      h = jnp.floor(jnp.sqrt(size * ratio)).astype(jnp.int32)
      x = jax.random.randint(kx, (), 0, width)
      y = jax.random.randint(ky, (), 0, height)
      return w, h, x, y, (x + w <= width) & (y + h <= height)

    def cond(carry):
      i, *_, fits = carry
      return (~fits) & (i < max_tries)

    def body(carry):
      i = carry[0] + 1
      return (i, *draw(i))

    _, w, h, x, y, fits = jax.lax.while_loop(cond, body, (0, *draw(0)))
    on = (jax.random.uniform(k_on, ()) < prob) & fits
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return on & (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w)

  return jax.vmap(one)(jax.random.split(key, batch))


def class_mask(key, labels, num_classes):
  """ClassMix masks: pixels of half of the classes present in each sample.

  Args:
    key: typed PRNG key.
    labels: [B, H, W] int pseudo-labels; values outside [0, num_classes) (void)
      count as no class and are never selected.
    num_classes: C, static.

  Returns:
    (mask, selected): mask [B, H, W] bool, True on pixels whose class was
    selected; selected [B, C] bool, exactly floor(n_present / 2) True per
    sample, all among the present classes.
  """
  batch = labels.shape[0]
  classes = jnp.arange(num_classes)
  flat = labels.reshape(batch, -1)
  present = jnp.any(flat[:, :, None] == classes[None, None, :], axis=1)
  num_present = jnp.sum(present, axis=-1)
  # A uniform random ranking of the present classes (absent ones rank last);
  # the first floor(n / 2) are a uniform random subset of that size.
  scores = jax.random.uniform(key, (batch, num_classes))
  scores = jnp.where(present, scores, 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  selected = present & (rank < (num_present // 2)[:, None])
  safe = jnp.clip(labels, 0, num_classes - 1)
  in_range = (labels >= 0) & (labels < num_classes)
  mask = in_range & jnp.take_along_axis(
      selected, safe.reshape(batch, -1), axis=1).reshape(labels.shape)
  return mask, selected


def mix(key, images, labels, confidence, mode, *, num_classes=None,
        ignore_label=255):
  """Mixes each sample with the next one in the batch.

  Args:
    key: typed PRNG key.
    images: [B, H, W, 3] float, ImageNet-normalised.
    labels: [B, H, W] int pseudo-labels.
    confidence: [B, H, W] float pseudo-label confidence.
    mode: 'cutout', 'cutmix' or 'classmix' (static).
    num_classes: C, static; required for 'classmix'.
    ignore_label: the void label written by 'cutout'.

  Returns:
    (images, labels, confidence) with the input shapes and dtypes.
  """
  if mode not in MODES:
    raise ValueError(f'mix: mode must be one of {MODES}, got {mode!r}.')
  if images.ndim != 4 or images.shape[:3] != labels.shape or (
      confidence.shape != labels.shape):
    raise ValueError(
        f'mix: expected images [B, H, W, 3], labels and confidence [B, H, W], '
        f'got {images.shape}, {labels.shape}, {confidence.shape}.')
  batch, height, width = labels.shape

  if mode == 'cutout':
    box = box_mask(key, batch, height, width)
    return (jnp.where(box[..., None], jnp.zeros((), images.dtype), images),
            jnp.where(box, jnp.asarray(ignore_label, labels.dtype), labels),
            jnp.where(box, jnp.zeros((), confidence.dtype), confidence))

  if mode == 'cutmix':
    from_self = ~box_mask(key, batch, height, width)
  else:
    if num_classes is None:
      raise ValueError("mix: mode 'classmix' needs num_classes (static int).")
    from_self, _ = class_mask(key, labels, num_classes)

  def blend(x, keep):
    partner = jnp.roll(x, -1, axis=0)  # partner[i] = x[(i + 1) % B]
    return jnp.where(keep, x, partner)

  return (blend(images, from_self[..., None]), blend(labels, from_self),
          blend(confidence, from_self))
