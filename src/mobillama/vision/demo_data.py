"""Offline demo data for MobiLlama-V from real images that install through the package registries.

- Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2): ~800 PNG drawings, each with a ``.txt``
  whose first line is an English caption ("A US 25 cent piece ($.25) called a quarter.").
- scikit-image's bundled photos (``skimage.data``, CC0/public domain): a dozen photos, captioned here.

Output directory::

    images/                  every image, shrunk to at most ``max_side`` px (PNG)
    captions-train.jsonl     {"image", "caption"} (stage 1)
    captions-val.jsonl       held-out stamps (every ``val_every``-th, by sorted path)
    captions-views.jsonl     held-out *views* of training stamps (every ``views_every``-th training
                             stamp, shrunk and shifted on its canvas): new images of objects whose
                             captions the model has seen; the caption can only be told from the image
    instruct.json            LLaVA records: "<image>\\nDescribe ..." -> caption, plus Q&A on the photos
    manifest.json            counts, sources, licences
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mobillama.checkpoint import atomic_directory, write_json
from mobillama.errors import MobiLlamaError

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
# skimage.data photos that ship inside the wheel (no pooch download), with one-line captions.
SKIMAGE_PHOTOS = {
    "astronaut": "An astronaut in a white space suit in front of a flag.",
    "camera": "A black and white photo of a man behind a camera on a tripod.",
    "cat": "A ginger cat with green eyes looking at the camera.",
    "coffee": "A cup of coffee on a saucer, seen from above.",
    "coins": "Rows of old coins on a dark background.",
    "horse": "The black silhouette of a horse on a white background.",
    "hubble_deep_field": "Many small galaxies in deep space.",
    "moon": "A grey close-up of the cratered surface of the moon.",
    "page": "A scanned page of printed text.",
    "rocket": "A rocket standing on its launch pad.",
    "text": "Hand-painted text on a weathered sign.",
    "brick": "A grey brick wall.",
    "grass": "A close-up of green grass.",
    "gravel": "A close-up of grey gravel.",
}
QUESTIONS = (
    "Describe this picture in one sentence.",
    "What is shown in this image?",
    "What do you see?",
)


def _first_line(txt: Path) -> str | None:
    try:
        line = txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return line or None


def _new_view(img, index: int, max_side: int):
    """A different image of the same stamp: shrunk to 80% and moved to one of four corners.

    Every pixel position changes, so a model cannot match it to its training image byte for byte,
    while the object, its colours and its shape stay recognisable.
    """
    from PIL import Image

    img = img.convert("RGBA")
    img.thumbnail((max_side, max_side))
    small = img.resize((max(1, img.width * 4 // 5), max(1, img.height * 4 // 5)), Image.BICUBIC)
    canvas = Image.new("RGBA", img.size, (0, 0, 0, 0))  # transparent: composited onto white when loaded
    dx, dy = img.width - small.width, img.height - small.height
    corner = [(0, 0), (dx, 0), (0, dy), (dx, dy)][index % 4]
    canvas.paste(small, corner)
    return canvas


def build_demo_data(
    out: str | Path,
    *,
    stamps_dir: str | Path = TUXPAINT_STAMPS,
    max_side: int = 128,
    val_every: int = 10,
    views_every: int = 5,
    limit: int | None = None,
    overwrite: bool = False,
    say=print,
) -> dict[str, Any]:
    """Write the caption and instruction sets (see the module docstring); returns the manifest."""
    from PIL import Image
    from tqdm import tqdm

    for key, value, least in (
        ("val_every", val_every, 2),
        ("views_every", views_every, 1),
        ("max_side", max_side, 8),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise MobiLlamaError(f"{key} must be an integer >= {least}, got {value!r}")
    stamps_dir = Path(stamps_dir)
    if not stamps_dir.is_dir():
        raise MobiLlamaError(
            f"{stamps_dir} not found: install the stamps with 'apt-get install tuxpaint-stamps-default' "
            "(or pass --stamps DIR)"
        )
    pairs = []
    for png in sorted(stamps_dir.rglob("*.png")):
        txt = png.with_suffix(".txt")
        caption = _first_line(txt) if txt.is_file() else None
        if caption:
            pairs.append((png, caption))
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise MobiLlamaError(f"{stamps_dir}: no PNG stamps with a caption .txt")
    train, val, views, instruct = [], [], [], []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for i, (png, caption) in enumerate(tqdm(pairs, desc="stamps", disable=None)):
            name = "stamp-" + "-".join(png.relative_to(stamps_dir).with_suffix("").parts) + ".png"
            with Image.open(png) as img:
                img.thumbnail((max_side, max_side))
                img.save(tmp / "images" / name)
            record = {"image": f"images/{name}", "caption": caption}
            (val if i % val_every == val_every - 1 else train).append(record)
            if i % val_every != val_every - 1 and (len(train) - 1) % views_every == 0:
                view = f"view-{name}"
                with Image.open(png) as img:
                    _new_view(img, len(views), max_side).save(tmp / "images" / view)
                views.append({"image": f"images/{view}", "caption": caption})
            if i % val_every != val_every - 1:
                instruct.append(
                    {
                        "id": f"stamp-{i}",
                        "image": f"images/{name}",
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
                            {"from": "gpt", "value": caption},
                        ],
                    }
                )
        photos = 0
        try:
            import skimage.data as skdata
        except ImportError:
            say("note: scikit-image is not installed; no photos added (pip install scikit-image)")
            skdata = None
        for key, caption in SKIMAGE_PHOTOS.items() if skdata else []:
            try:
                array = getattr(skdata, key)()
            except Exception as e:  # a loader that needs a download (pooch) or a missing file: skip it
                say(f"note: skimage.data.{key} unavailable ({type(e).__name__}); skipped")
                continue
            img = Image.fromarray(array)
            img.thumbnail((max_side, max_side))
            img.save(tmp / "images" / f"photo-{key}.png")
            photos += 1
            train.append({"image": f"images/photo-{key}.png", "caption": caption})
            instruct.append(
                {
                    "id": f"photo-{key}",
                    "image": f"images/photo-{key}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is in this photo?"},
                        {"from": "gpt", "value": caption},
                        {"from": "human", "value": "Is it a photo or a drawing?"},
                        {"from": "gpt", "value": "It is a photo."},
                    ],
                }
            )
        files = {"captions-train.jsonl": train, "captions-val.jsonl": val, "captions-views.jsonl": views}
        for name, rows in files.items():
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / "instruct.json").write_text(json.dumps(instruct, indent=1), encoding="utf-8")
        manifest = {
            "stamps": len(pairs),
            "photos": photos,
            "captions_train": len(train),
            "captions_val": len(val),
            "captions_views": len(views),
            "instruct": len(instruct),
            "max_side": max_side,
            "sources": {
                "tuxpaint-stamps-default (Debian)": "GPL-2; captions = first line of each stamp's .txt",
                "scikit-image skimage.data": "CC0 / public domain; captions written for this set",
            },
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest
