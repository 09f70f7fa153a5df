"""Segments image files with a trained workdir's model.

  python -m reco_jax.predict --workdir=runs/voc200 --images='photos/*.jpg' --out=masks/

For every image it writes, in --out:
  STEM_mask.png     the class map in the dataset's colours (VOC's colour map for reco_voc)
  STEM_ids.png      the raw class ids, one byte per pixel (a greyscale PNG)
  STEM_overlay.png  the colours blended over the image (alpha 0.7, as the reference's
                    visual.py)

Images of any size: each is padded (bottom/right, reflected, as in evaluation) to a bucket
size, the config's eval_size when it fits, else the next multiple of 64 beyond it
(inference.bucket_size), and the batches of a bucket run through one jitted steps.predict; the
class map is cropped back to the image. An image no larger than eval_size therefore gets
exactly the prediction the trainer's evaluation makes for it. The evaluated variables are those
of training (the EMA teacher for semi-supervised runs). Runs in one process, on all its
devices.
"""
from collections.abc import Sequence
import collections

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np
from PIL import Image
from PIL import ImageOps

from reco_jax import inference
from reco_jax import parallel
from reco_jax import viz
from reco_jax import workdir as workdir_lib

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


def load_image(path: str | epath.Path) -> np.ndarray:
  """uint8 [H, W, 3] RGB pixels of an image file (grey, palette, RGBA... converted), upright
  by its EXIF orientation as viewers show it (and as the training data are read)."""
  path = epath.Path(path)
  try:
    with path.open('rb') as f:
      image = ImageOps.exif_transpose(Image.open(f))
      return np.asarray(image.convert('RGB'), np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read {path} as an image ({e}); pass image files (JPEG, PNG, '
                     '...) to --images.') from e


def find_images(patterns: Sequence[str]) -> list[epath.Path]:
  """The files `patterns` name (globs expanded, directories read), or a clear error."""
  paths = workdir_lib.expand_paths(patterns)
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(f'No such image files: {missing}.')
  files = []
  for path in paths:  # A directory stands for the image files in it.
    files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                 if path.is_dir() else [path])
  if not files:
    raise FileNotFoundError(
        f'--images={",".join(patterns)} matches no image files; pass files or a quoted glob '
        "such as --images='photos/*.jpg'.")
  stems = collections.Counter(p.stem for p in files)
  clashes = sorted(s for s, n in stems.items() if n > 1)
  if clashes:
    raise ValueError(f'Several images share the file names {clashes}; their outputs would '
                     'overwrite each other. Predict them into separate --out directories.')
  return files


def predict_images(run: workdir_lib.Run, images: Sequence[np.ndarray], *,
                   batch_size: int | None = None,
                   mesh: jax.sharding.Mesh | None = None) -> list[np.ndarray]:
  """Class maps of uint8 [h, w, 3] images: a list of int32 [h, w], in the input order.

  Images are grouped by bucket size (inference.bucket_size of the config's eval_size) and run
  in fixed-size batches (the last one padded with zeros) through one jitted steps.predict per
  bucket.
  """
  mesh = mesh or parallel.make_mesh()
  batch_size = workdir_lib.check_batch(batch_size or run.config.eval_batch_size,
                                       '--batch_size')
  predict_fn = inference.make_predict_fn(run.model, mesh)
  variables = run.eval_variables()
  eval_size = tuple(run.config.eval_size)
  for i, image in enumerate(images):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f'Image {i} is {image.dtype} {image.shape}; expected uint8 [H, W, 3].')
  return inference.map_in_buckets(
      lambda batch: jax.device_get(predict_fn(variables, parallel.shard_batch(mesh, batch))),
      images, eval_size, batch_size)


def write_prediction(out_dir: epath.Path, stem: str, image: np.ndarray, classes: np.ndarray,
                     palette: np.ndarray, alpha: float = 0.7) -> dict[str, epath.Path]:
  """Writes STEM_mask.png, STEM_ids.png and STEM_overlay.png; returns their paths by kind."""
  if classes.max(initial=0) > 255:
    raise ValueError('Class ids above 255 do not fit the one-byte id PNG.')
  ids = classes.astype(np.uint8)
  pictures = {'mask': viz.colorize(ids, palette), 'ids': ids,
              'overlay': viz.overlay(image, ids, palette, alpha)}
  paths = {}
  for kind, pixels in pictures.items():
    path = out_dir / f'{stem}_{kind}.png'
    with path.open('wb') as f:
      Image.fromarray(pixels).save(f, format='PNG')
    paths[kind] = path
  return paths


def predict_files(workdir: str, patterns: Sequence[str], out: str,
                  checkpoint: str | int = 'best', batch_size: int | None = None,
                  alpha: float = 0.7) -> list[dict[str, epath.Path]]:
  """Predicts every image `patterns` name and writes its three PNGs to `out`."""
  files = find_images(patterns)
  out_dir = workdir_lib.check_output_dir(out, '--out')  # Before the model loads.
  mesh = parallel.make_mesh()
  run = workdir_lib.load_run(workdir, checkpoint, mesh=mesh)
  images = [load_image(p) for p in files]
  classes = predict_images(run, images, batch_size=batch_size, mesh=mesh)
  palette = viz.dataset_palette(run.config.dataset)
  return [write_prediction(out_dir, p.stem, image, c, palette, alpha)
          for p, image, c in zip(files, images, classes)]


def define_flags() -> None:
  """The tool's flags; defined only when it runs, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Training workdir (holds config.json and checkpoints/).')
  flags.DEFINE_list('images', None, "Image files or globs, e.g. 'photos/*.jpg'.")
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
  flags.DEFINE_integer('batch_size', None, "Images per jitted batch (default: the config's "
                       'eval_batch_size); a multiple of the device count.')
  flags.DEFINE_float('alpha', 0.7, 'Weight of the class colours in the overlay.')
  flags.mark_flags_as_required(['workdir', 'images', 'out'])


@workdir_lib.user_errors
def main(argv):
  f = flags.FLAGS
  # An unquoted glob reaches us expanded by the shell: its other files come as arguments.
  patterns = list(f.images) + list(argv[1:])
  written = predict_files(f.workdir, patterns, f.out, f.checkpoint, f.batch_size, f.alpha)
  print(f'Wrote masks, class ids and overlays of {len(written)} images to {f.out}.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
