"""Token ids for the simulator's ``/tokenize`` and ``/detokenize``.

The simulator counts text in the word and punctuation pieces of :func:`tandem.prefix.tokenize` (its
stand-in for a BPE vocabulary); each piece gets a stable id (:func:`tandem.prefix.piece_ids`, the ids
its KV-cache events carry too), and
the pieces seen last are remembered so ``/detokenize`` can spell ids back (joined by spaces: the
pieces do not record the whitespace between them). Memory is bounded: an id whose piece was
forgotten, or never seen, detokenizes to nothing.
"""

from __future__ import annotations

from collections import OrderedDict

from tandem.prefix import piece_ids, tokenize


class Vocabulary:
    def __init__(self, remembered: int = 65536) -> None:
        self.remembered = remembered
        self._pieces: OrderedDict[int, str] = OrderedDict()

    def encode(self, text: str) -> list[int]:
        pieces = tokenize(text)
        ids = piece_ids(pieces)
        for i, piece in zip(ids, pieces, strict=True):
            self._pieces[i] = piece
            self._pieces.move_to_end(i)
        while len(self._pieces) > self.remembered:
            self._pieces.popitem(last=False)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(p for i in ids if (p := self._pieces.get(i)) is not None)
