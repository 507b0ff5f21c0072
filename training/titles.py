"""Words of item titles: what the bundle builder's pair features, the catalog's word counts
(:meth:`serving.view.BundleView.rarity`) and the intent-bundle data's substitute label compare.

A title's words are its lower-cased runs of letters and digits, two or more long, as a set: "USB-C Cable,
2m" holds ``{"usb", "cable", "2m"}``. No stemming and no stop words: the words two items share are mostly
brands, product lines and kinds ("Izod", "Dreamfields", "tea"), and how rare a word is over the catalog
tells those apart.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1 << 18)
def title_words(title: str) -> frozenset[str]:
    """The lower-cased words of a title (two or more letters or digits): cached, titles repeat in every pair
    the bundle builder scores (labels use :func:`serving.bundles._words`, which keeps case and order)."""
    return frozenset(w for w in "".join(c.lower() if c.isalnum() else " " for c in title).split() if len(w) > 1)


def title_overlap(a: str, b: str) -> float:
    """Jaccard similarity of two titles' word sets."""
    wa, wb = title_words(a), title_words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0
