"""A domain's model card: what it segments, what it was trained on, how well, and what not to use it for.

The card is built from an adapter's metadata, so it travels with the weights (a shared ``.u2d``
file, :mod:`training.model.domain_file`). Its words come from the optional ``card`` object of the
metadata (keys :data:`CARD_KEYS`, written by whoever made the domain); every field left out there is
derived, honestly, from the rest of the metadata: the training provenance (dataset, date, command,
the fine-tune panel's record), the held-out evaluation the recipe stored, and a calibration entry
when one is present. Derived fields are listed in :attr:`ModelCard.derived`, so a reader can tell
the author's statement from the program's inference.

Torch-free (it reads a metadata ``dict``, e.g. :func:`training.model.layout.read_header_meta`), so
listings and the GUI can show cards without loading weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# What an author may write in the metadata's ``card`` object (see modelfile.validate_adapter_meta).
CARD_KEYS = ("data", "data_kind", "cases", "author", "date", "tool", "intended_use", "limits", "calibration",
             "derived")
DATA_KINDS = ("synthetic", "real", "one-subject", "user-labels")
FINETUNE_SOURCE = "napari-u2net fine-tune panel"
SYNTHETIC_LIMIT = "trained on synthetic phantoms: not validated on patients"
_CASES_RE = re.compile(r"\((\d+) training cases?\)")


@dataclass
class ModelCard:
    """One domain's card; :meth:`text` is what ``u2net info --domain`` and the plugin show."""

    domain: str
    modality: str
    modalities: list[str]
    classes: list[str]  # foreground classes (background left out)
    spacing: list[float]  # z, y, x mm
    data: str  # what it was trained on
    data_kind: str | None  # one of DATA_KINDS, None when unknown
    cases: int | None
    author: str
    date: str
    tool: str
    heldout_dice: float | None = None  # mean foreground Dice on held-out cases
    heldout_cases: int | None = None
    heldout_per_class: dict[str, float] = field(default_factory=dict)
    own_labels_dice: float | None = None  # fine-tuned: Dice on the user's own labels (not held out)
    calibration: str = ""  # "" when unknown
    intended_use: str = ""
    limits: str = ""
    derived: list[str] = field(default_factory=list)  # fields the author did not write

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """Plain text, one fact a line (read-only dialog, tooltip, terminal)."""
        mods = ", ".join(self.modalities)
        spacing = " × ".join(f"{s:.3g}" for s in self.spacing)
        made = [self.author or "author not recorded", self.date or "date not recorded"]
        if self.tool:
            made.append(self.tool)
        lines = [
            f"Domain: {self.domain}",
            f"Modality: {self.modality} (input: {mods})",
            f"Classes: {', '.join(self.classes) or '—'}",
            f"Spacing: {spacing} mm (z, y, x)",
            f"Trained on: {self.data}" + (f" ({self.cases} cases)" if self.cases else ""),
            "Made by: " + " · ".join(made),
            f"Held-out Dice: {self.dice_text()}",
        ]
        if self.own_labels_dice is not None:
            lines.append(f"Dice on the labels it was taught from (not held out): {self.own_labels_dice:.3f}")
        lines += [
            f"Calibration: {self.calibration or 'not measured'}",
            f"Intended use: {self.intended_use}",
            f"Limits: {self.limits}",
        ]
        if self.derived:
            lines.append(f"(derived from the training record: {', '.join(self.derived)})")
        return "\n".join(lines)

    def dice_text(self) -> str:
        if self.heldout_dice is None:
            return "not measured"
        per = ", ".join(f"{k} {v:.3f}" for k, v in self.heldout_per_class.items())
        on = f" on {self.heldout_cases} cases" if self.heldout_cases else ""
        return f"{self.heldout_dice:.3f}{on}" + (f" ({per})" if per and len(self.heldout_per_class) > 1 else "")


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _dataset_doc(prov: dict) -> dict:
    """The training dataset's ``dataset.json`` when it is still on this machine, else {}."""
    path = prov.get("dataset")
    if not isinstance(path, str) or not path:
        return {}
    try:
        doc = json.loads((Path(path) / "dataset.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _data_from_provenance(meta: dict, prov: dict) -> tuple[str, str | None, int | None]:
    """(what it was trained on, its kind, number of cases) from the training record."""
    if prov.get("source") == FINETUNE_SOURCE:
        pairs = [p for p in prov.get("pairs", []) if isinstance(p, dict)]
        slices = sum(int(p.get("labelled_slices") or 0) for p in pairs)
        images = ", ".join(str(p.get("image")) for p in pairs)
        only = " (only the labelled slices)" if prov.get("only_labelled_slices") else ""
        return (f"labels corrected by hand in napari: {images or 'images'}, {slices} labelled slice(s){only}",
                "user-labels", len(pairs) or None)
    if prov.get("source") == "in-memory annotations":
        return "annotated images given to the fine-tuning API", "user-labels", _int(prov.get("cases"))
    match = _CASES_RE.search(str(meta.get("description", "")))
    cases = int(match.group(1)) if match else None
    doc = _dataset_doc(prov)
    ours = doc.get("u2net") if isinstance(doc.get("u2net"), dict) else {}
    name = str(doc.get("name") or meta.get("domain", ""))
    if "synth" in ours:
        return f"synthetic phantoms ({name}, seed {ours['synth'].get('seed')})", "synthetic", cases
    if "mni152" in str(ours.get("generator", "")):
        return "the MNI152 2009 template (one real subject) under random deformations", "one-subject", cases
    if doc:
        return f"the dataset {name!r}" + (f": {doc['description']}" if doc.get("description") else ""), None, cases
    if prov.get("dataset"):
        return f"the dataset at {prov['dataset']} (not described in the file)", None, cases
    return "not described in the file", None, cases


def _int(x) -> int | None:
    return int(x) if isinstance(x, int) and not isinstance(x, bool) else None


def calibration_text(meta: dict) -> str:
    """The ``calibration`` entry (temperature scaling: ``temperature``, ``ece_before``/``ece_after``,
    ``cases``), or a card's ``calibration`` text, in words; "" when there is none."""
    cal = meta.get("calibration")
    if cal is None:
        cal = (meta.get("card") or {}).get("calibration")
    if isinstance(cal, str):
        return cal
    if not isinstance(cal, dict) or _number(cal.get("temperature")) is None:
        return ""
    text = f"temperature {cal['temperature']:.3g}"
    before, after = _number(cal.get("ece_before")), _number(cal.get("ece_after"))
    if before is not None and after is not None:
        text += f", expected calibration error {before:.3f} → {after:.3f}"
    if _int(cal.get("cases")):
        text += f" (fitted on {cal['cases']} validation cases)"
    return text


def _tool(prov: dict) -> str:
    if prov.get("source") == FINETUNE_SOURCE:
        return FINETUNE_SOURCE
    command = str(prov.get("command", "")).split()
    if not command:
        return ""
    if command[0].endswith("u2net") and len(command) > 1:
        return f"u2net {command[1]}"
    if command[:2] == ["python", "-m"] and len(command) > 2:
        return f"python -m {command[2]}"
    return Path(command[0]).name


def _default_limits(kind: str | None, dice_own: float | None) -> str:
    if kind == "synthetic":
        return SYNTHETIC_LIMIT
    if kind == "one-subject":
        return ("trained on one subject's brain under synthetic deformations: shows the pipeline on a "
                "real MR, not how it generalises to other people")
    if kind == "user-labels":
        own = f" (Dice {dice_own:.2f})" if dice_own is not None else ""
        return (f"checked only against the labels it was taught from{own}: not validated on other images; "
                "review every result")
    return "the file does not say what it was trained on: validate it on your own data before relying on it"


def card_from_meta(meta) -> ModelCard:
    """The card of one adapter from its metadata (a dict as stored, or an ``AdapterMeta``)."""
    if not isinstance(meta, dict):
        meta = meta.to_dict()
    prov = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    written = meta.get("card") if isinstance(meta.get("card"), dict) else {}
    classes = [str(c.get("name")) if isinstance(c, dict) else str(c) for c in meta.get("classes", [])][1:]
    if all(written.get(k) not in (None, "") for k in ("data", "data_kind", "cases")):
        data, kind, cases = written["data"], written["data_kind"], written["cases"]  # no file to read
    else:
        data, kind, cases = _data_from_provenance(meta, prov)
    heldout = prov.get("heldout_evaluation") if isinstance(prov.get("heldout_evaluation"), dict) else {}
    per_class = heldout.get("mean_dice_per_class") if isinstance(heldout.get("mean_dice_per_class"), dict) else {}
    own = _number(prov.get("val_dice_on_own_labels"))
    kind = written.get("data_kind", kind)
    derived_values = {
        "data": data,
        "cases": cases,
        "author": "",
        "date": str(prov.get("date", ""))[:10],
        "tool": _tool(prov),
        "intended_use": (f"research: segmenting {', '.join(classes) or 'its classes'} on "
                         f"{meta.get('modality', '')} images like those it was trained on; not a medical device"),
        "limits": _default_limits(kind, own),
    }
    values = {}
    derived = [k for k in written.get("derived", []) if isinstance(k, str) and k in derived_values]
    for key, default in derived_values.items():
        if written.get(key) not in (None, ""):
            values[key] = written[key]
        else:
            values[key] = default
            if default not in (None, ""):
                derived.append(key)
    return ModelCard(
        domain=str(meta.get("domain", "")),
        modality=str(meta.get("modality", "")),
        modalities=[str(m) for m in meta.get("modalities", [])],
        classes=classes,
        spacing=[float(s) for s in meta.get("spacing", [1.0, 1.0, 1.0])],
        data=str(values["data"]),
        data_kind=kind if kind in DATA_KINDS else None,
        cases=_int(values["cases"]),
        author=str(values["author"]),
        date=str(values["date"]),
        tool=str(values["tool"]),
        heldout_dice=_number(heldout.get("mean_dice")),
        heldout_cases=_int(heldout.get("cases")),
        heldout_per_class={str(k): float(v) for k, v in per_class.items() if _number(v) is not None},
        own_labels_dice=own,
        calibration=calibration_text(meta),
        intended_use=str(values["intended_use"]),
        limits=str(values["limits"]),
        derived=derived,
    )


def resolved_card(meta) -> dict:
    """The card's words as an author's ``card`` object: what is written, plus the derived fields
    frozen in (an exported domain keeps its card where the training data's folder is gone)."""
    card = card_from_meta(meta)
    written = (meta.get("card") if isinstance(meta, dict) else getattr(meta, "card", None)) or {}
    out = {k: v for k, v in written.items()}
    for key in ("data", "cases", "date", "tool", "intended_use", "limits"):
        value = getattr(card, key)
        if key not in out and value not in (None, ""):
            out[key] = value
    if card.data_kind and "data_kind" not in out:
        out["data_kind"] = card.data_kind
    if card.derived:
        out["derived"] = list(card.derived)  # still the program's inference, not the author's word
    return out
