"""On-device strong augmentation of the mixed unlabelled batch.

Mirrors what the reference ReCo applies after mixing (`batch_transform` with
scale 1.0: the resize and crop are identities), per sample and in this order,
with the parameters of `reco_jax.photometric`:

1. colour jitter: brightness, contrast and saturation factors, a hue shift,
   the four applied in a random order (torchvision `ColorJitter` on PIL
   images), each clipping to [0, 1];
2. Gaussian blur: a separable Gaussian kernel of 2 * BLUR_RADIUS + 1 taps,
   the border extended symmetrically (edge pixel repeated). PIL itself
   approximates the Gaussian with three box blurs, this one is exact;
3. horizontal flip of image, label and confidence.

Images arrive ImageNet-normalised; they are denormalised and clipped to [0, 1]
(the reference goes through 8-bit PIL images, which clips), augmented, and
normalised again. Unlike the reference, nothing is quantised to 8 bits.
"""
import dm_pix
import jax
import jax.numpy as jnp

from reco_jax import normalization
from reco_jax import photometric as P

_KERNEL_SIZE = 2 * P.BLUR_RADIUS + 1


def grey(image):
  """PIL's convert('L') grey level of [..., 3] in [0, 1]: [..., 1]."""
  r, g, b = P.GREY_WEIGHTS
  return (r * image[..., 0] + g * image[..., 1] + b * image[..., 2])[..., None]


def _blend(image, other, factor):
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  """torchvision brightness: clip(factor * image). image [H, W, 3] in [0, 1]."""
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image, factor):
  """torchvision (PIL) contrast: blend with the mean grey level of the whole image.

  (dm-pix and TF use per-channel means instead.) image [H, W, 3] in [0, 1].
  """
  mean = jnp.mean(grey(image))
  return _blend(image, mean, factor)


def adjust_saturation(image, factor):
  """torchvision (PIL) saturation: blend with the per-pixel grey image.

  (dm-pix and TF scale the HSV saturation instead.) image [H, W, 3] in [0, 1].
  """
  return _blend(image, grey(image), factor)


def adjust_hue(image, hue_shift):
  """torchvision hue: rotate the HSV hue by `hue_shift` (mod 1).

  dm-pix's HSV round trip is the same as torchvision's for inputs in [0, 1].
  image [H, W, 3] in [0, 1]; hue_shift in [-0.5, 0.5].
  """
  return dm_pix.adjust_hue(image, hue_shift)


def gaussian_blur(image, sigma, kernel_size=_KERNEL_SIZE):
  """Separable Gaussian blur with a symmetric border.

  Written as a sum of shifted copies rather than with dm-pix's convolution:
  with a different sigma per sample (under vmap) the convolution becomes a
  grouped convolution with per-sample kernels, several times slower on CPU.

  Args:
    image: [H, W, C] float.
    sigma: scalar standard deviation in pixels (may be traced).
    kernel_size: odd static kernel size.

  Returns:
    [H, W, C]; the kernel sums to 1, so a constant image is unchanged.
  """
  radius = kernel_size // 2
  height, width = image.shape[:2]
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-taps**2 / (2.0 * jnp.square(sigma)))
  weights = (weights / jnp.sum(weights)).astype(image.dtype)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)),
                   mode='symmetric')
  rows = sum(weights[i] * padded[i:i + height] for i in range(kernel_size))
  return sum(weights[i] * rows[:, i:i + width] for i in range(kernel_size))


def color_jitter(image, order, brightness, contrast, saturation, hue):
  """The four colour ops in the given order (torchvision `ColorJitter`).

  Args:
    image: [H, W, 3] float in [0, 1].
    order: [4] int permutation of (0 brightness, 1 contrast, 2 saturation,
      3 hue); may be traced.
    brightness, contrast, saturation: scalar factors.
    hue: scalar hue shift.

  Returns:
    [H, W, 3] in [0, 1].
  """
  # Under vmap a data-dependent switch evaluates every branch; the HSV round
  # trip is the costly one, so it runs once: the blends placed before it in
  # `order`, then the hue shift, then the blends placed after it.
  hue_step = jnp.argmax(order == 3)

  def blend_step(x, step, active):
    op = order[step]
    out = jnp.where(op == 0, adjust_brightness(x, brightness), x)
    out = jnp.where(op == 1, adjust_contrast(x, contrast), out)
    out = jnp.where(op == 2, adjust_saturation(x, saturation), out)
    return jnp.where(active, out, x)

  for step in range(3):  # the hue shift is at most at position 3
    image = blend_step(image, step, step < hue_step)
  image = adjust_hue(image, hue)
  for step in range(1, 4):
    image = blend_step(image, step, step > hue_step)
  return image


def strong_augment(key, images, labels, confidence, *, jitter_prob=P.JITTER_PROB,
                   grey_prob=0.0, blur_prob=P.BLUR_PROB, flip_prob=P.FLIP_PROB,
                   brightness=P.JITTER_FACTOR, contrast=P.JITTER_FACTOR,
                   saturation=P.JITTER_FACTOR, hue=(-P.JITTER_HUE, P.JITTER_HUE),
                   sigma=P.BLUR_SIGMA, blur_kernel_size=_KERNEL_SIZE):
  """Per-sample colour jitter, Gaussian blur and horizontal flip.

  Args:
    key: typed PRNG key.
    images: [B, H, W, 3] float, ImageNet-normalised.
    labels: [B, H, W] int.
    confidence: [B, H, W] float.
    jitter_prob, blur_prob, flip_prob: per-sample probabilities.
    grey_prob: per-sample probability of PIL's grey image (3 equal channels) after the
      colour jitter (torchvision `RandomGrayscale`; UniMatch's strong views); the reference
      ReCo has none.
    brightness, contrast, saturation: (low, high) factor ranges.
    hue: (low, high) hue shift range, within [-0.5, 0.5].
    sigma: (low, high) blur sigma range.
    blur_kernel_size: odd static blur kernel size.

  Returns:
    (images, labels, confidence) with the input shapes and dtypes; images
    normalised again, so within normalize([0, 1]).
  """
  if images.ndim != 4 or images.shape[-1] != 3 or (
      images.shape[:3] != labels.shape) or confidence.shape != labels.shape:
    raise ValueError(
        f'strong_augment: expected images [B, H, W, 3], labels and confidence '
        f'[B, H, W], got {images.shape}, {labels.shape}, {confidence.shape}.')
  if blur_kernel_size % 2 != 1:
    raise ValueError(
        'strong_augment: blur_kernel_size must be odd, got '
        f'{blur_kernel_size}.')
  batch = images.shape[0]
  keys = jax.random.split(key, 9)
  uniform = lambda k, lo_hi: jax.random.uniform(
      k, (batch,), minval=lo_hi[0], maxval=lo_hi[1])
  draws = dict(
      do_jitter=jax.random.uniform(keys[0], (batch,)) < jitter_prob,
      order=jnp.argsort(jax.random.uniform(keys[1], (batch, 4)), axis=-1),
      brightness=uniform(keys[2], brightness),
      contrast=uniform(keys[3], contrast),
      saturation=uniform(keys[4], saturation),
      hue=uniform(keys[5], hue),
      do_blur=jax.random.uniform(keys[6], (batch,)) < blur_prob,
      sigma=uniform(keys[7], sigma),
      do_flip=jax.random.uniform(keys[8], (batch,)) < flip_prob)
  per_sample = lambda a, v: v.reshape((batch,) + (1,) * (a.ndim - 1))

  x = jnp.clip(normalization.denormalize(images.astype(jnp.float32)), 0., 1.)

  jittered = jax.vmap(color_jitter)(
      x, draws['order'], draws['brightness'], draws['contrast'],
      draws['saturation'], draws['hue'])
  x = jnp.where(per_sample(x, draws['do_jitter']), jittered, x)
  if grey_prob:  # A key of its own: the other draws stay those of the reference's recipe.
    do_grey = jax.random.uniform(jax.random.fold_in(key, len(keys)), (batch,)) < grey_prob
    x = jnp.where(per_sample(x, do_grey), jnp.broadcast_to(grey(x), x.shape), x)

  blurred = jax.vmap(lambda im, s: gaussian_blur(im, s, blur_kernel_size))(
      x, draws['sigma'])
  x = jnp.where(per_sample(x, draws['do_blur']), blurred, x)

  flip = lambda a: jnp.where(per_sample(a, draws['do_flip']), a[:, :, ::-1], a)
  x, labels, confidence = flip(x), flip(labels), flip(confidence)

  images = normalization.normalize(x).astype(images.dtype)
  return images, labels, confidence
