"""Write the model card of each bundled domain into its adapter's metadata (``make model``'s last step).

Only the ``card`` field changes: each file is read (and verified) from disk right before it is
rewritten, so fields another step added meanwhile (e.g. ``calibration``) are kept, and the tensors
are written back exactly as stored (checked: same tensor digest, so bit-identical weights).
Held-out Dice is not repeated here: it is in each adapter's provenance (``heldout_evaluation``),
which the card shows. Running it twice changes nothing.

    python -m scripts.domain_cards resources/models/default
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training import __version__
from training.model.card import SYNTHETIC_LIMIT

AUTHOR = "napari-u2net project (recipe scripts/default_model.py, `make model`)"
TOOL = f"napari-u2net {__version__} training core"
INTENDED = ("trying the plugin and the u2net commands, and as the shared trunk to teach new organs on "
            "(Fine-tune panel, u2net adapt); research only, not a medical device")
SYNTH = "synthetic {what} phantoms from training.data.synth ({name}, seed 0{scale})"
CARDS = {
    "spleen-ct": {"data": SYNTH.format(what="abdominal CT", name="spleen-ct", scale=", size scale 0.75"),
                  "data_kind": "synthetic"},
    "prostate-mr": {"data": SYNTH.format(what="prostate MR (T2 + ADC)", name="prostate-mr", scale=", size scale 0.75"),
                    "data_kind": "synthetic"},
    "hippocampus-mr": {"data": SYNTH.format(what="hippocampus MR", name="hippocampus-mr", scale=", size scale 0.75"),
                       "data_kind": "synthetic"},
    "heart-mr": {"data": SYNTH.format(what="cardiac MR", name="heart-mr", scale=", size scale 1.0")
                 + "; taught on the frozen trunk (600 adapter-only iterations)", "data_kind": "synthetic"},
    "mni152-brain": {
        "data": ("the MNI152 2009 T1 template (ONE real subject, shipped in nilearn's wheel) at 3 mm under random "
                 "pose, elastic deformation and intensity changes; grey/white matter from its probability maps"),
        "data_kind": "one-subject",
        "limits": ("one subject: shows that the pipeline handles a real T1's contrast and anatomy, not how it "
                   "generalises to other people's brains; not validated on patients"),
    },
}


def card_for(domain: str) -> dict:
    card = {"author": AUTHOR, "tool": TOOL, "intended_use": INTENDED, **CARDS[domain]}
    card.setdefault("limits", SYNTHETIC_LIMIT + "; its held-out Dice is measured on more phantoms of the same generator")
    card["cases"] = 38
    return card


def write_card(path: Path, card: dict) -> bool:
    """Set ``card`` in one adapter file; True if the file changed. The weights stay bit-identical."""
    from training.model.modelfile import read_weights, tensors_digest, write_weights

    state, meta = read_weights(path, "adapter")  # read now, not earlier: keep others' fields
    if meta.get("card") == card:
        return False
    before = tensors_digest(state)
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    if len(dtypes) != 1:
        raise SystemExit(f"{path}: tensors of several dtypes ({dtypes}); not rewritten")
    write_weights(path, state, {**meta, "card": card}, dtype=dtypes.pop())
    after, new_meta = read_weights(path, "adapter")
    if tensors_digest(after) != before or new_meta["checksum"]["weights"] != meta["checksum"]["weights"]:
        raise SystemExit(f"{path}: the weights changed while rewriting the card; restore the file")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    args = p.parse_args(argv)
    from training.model.layout import ADAPTER_DIR, ADAPTER_SUFFIX

    for path in sorted((args.model_dir / ADAPTER_DIR).glob(f"*{ADAPTER_SUFFIX}")):
        if path.stem not in CARDS:
            print(f"{path.stem}: no card text here; its card is derived from its provenance", file=sys.stderr)
            continue
        changed = write_card(path, card_for(path.stem))
        print(f"{path.stem}: {'card written' if changed else 'card unchanged'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
