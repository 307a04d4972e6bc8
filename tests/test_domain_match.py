"""Which domain the selector ticks when a model has a synthetic-only and a real-trained CT domain."""

from training.model.domain_match import pick_domain, trained_on_phantoms
from training.model.modelfile import AdapterMeta, make_classes


def test_a_real_trained_domain_is_ticked_over_phantom_ones():
    cands = [("spleen-ct", "CT", 1, True), ("abdomen-ct", "CT", 1, False), ("heart-mr", "MR", 1, True)]
    pick = pick_domain(cands, 1, "CT")
    assert pick.domain == "abdomen-ct" and "real scans" in pick.reason and "spleen-ct" in pick.reason
    assert pick_domain(cands, 1, "CT", named="spleen-ct").domain == "spleen-ct"  # the sample names its own
    # two real-trained CT domains (or none): a tie, nothing ticked
    assert pick_domain([*cands, ("liver-ct", "CT", 1, False)], 1, "CT").domain is None
    assert pick_domain([("a", "CT", 1, True), ("b", "CT", 1, True)], 1, "CT").domain is None
    assert pick_domain([("a", "CT", 1), ("b", "CT", 1)], 1, "CT").domain is None  # 3-tuples: not synthetic


def test_trained_on_phantoms_reads_the_model_card():
    meta = AdapterMeta("x", ["CT"], make_classes(["bg", "a"]), modality="CT")
    assert not trained_on_phantoms(meta)  # no card: unknown, not synthetic
    meta.card = {"data_kind": "synthetic"}
    assert trained_on_phantoms(meta)
    meta.card = {"data_kind": "one-patient"}
    assert not trained_on_phantoms(meta)
