"""Deterministic synthetic corpus that teaches long-range retrieval to a tiny byte-level LM.

Each document mixes plain filler sentences with facts that are stated early and asked about
later, so predicting the answer requires looking back:

* key-value:  ``key 4821 = 73019.``  ...  ``The value of key 4821 is 73019.``
* pass key:   ``The pass key is 58213. Remember it.``  ...
  ``What is the pass key? The pass key is 58213.``

Every stated fact is asked exactly once, and only stated facts are asked. A document holds
1..`max_facts` facts (at most one pass key; key-value facts have distinct keys), so several
statements can stand between a query and its answer. Filler uses a small built-in word list
with no digits, so the only numbers in a document are keys and values.

Distance is counted in characters from the end of a statement (after its period) to the start
of its query. The text is ASCII, so with the byte tokenizer characters == tokens. Each fact's
distance is drawn uniformly from [min_distance, max_distance]; when events collide the later
one is pushed back, and a document whose pushed distance would exceed max_distance is redrawn,
so every recorded distance lies in [min_distance, max_distance]. Documents are about
100 + max_distance characters long, so with max_distance well under the training sequence
length the fact and its query usually land in one sequence.

Four more document kinds; the first two are the evaluation prompts themselves, followed by
their answer, so a tiny model can learn the exact formats it is evaluated on (templates and
the passkey renderer come from `hybrid_megatron.eval.tasks`, so they cannot drift):

* niah:    RULER niah_single_1 (noise haystack, one needle "One of the special magic numbers
  for {word-key} is: {7 digits}.", question, answer prefix) + " {value}."; the haystack
  holds 0..max_haystack // 92 noise lines, the needle goes at a random depth.
* passkey_prompt:  the passkey prompt (description, min_distance..max_haystack filler
  characters with "The pass key is {key}. Remember it. {key} is the pass key." at a random
  depth, question) + " The pass key is {key}."
* copy:    blocks "Copy: {5-digit numbers}. Again: {the same numbers}." whose repeat starts
  min_distance..max_distance characters after the original (in-context copying practice).
* repeat:  "Repeat: {s} | {s} | {s} ..." where s is a string of random lowercase words whose
  copies are min_distance..max_distance characters apart, over 6 x max_distance characters.
  Almost every token after the first copy is predictable only by looking back one copy, and
  letters (unlike digits) rarely repeat by chance, so this dense, unambiguous signal is what
  lets an induction (look back and copy) circuit form in a small model; eval-format
  documents alone are too sparse. In half of the repeat documents, half of the words are
  7-digit numbers instead: copying digit runs (what niah answers need) is then practised
  between unambiguous word anchors.

`niah_fraction`, `passkey_fraction`, `copy_fraction` and `repeat_fraction` of the documents
are of these kinds; the rest are the recall documents above. `max_haystack` (default
`max_distance`) sizes the niah and passkey haystacks apart from the look-back distances, so
eval-format prompts can span the evaluated lengths while repeats stay short enough to learn.

With `doc_length` set, every document is exactly `doc_length` characters: niah/passkey
haystacks grow to fill it, copy documents hold as many blocks as fit, and the remainder is
padded with noise text (a document whose smallest form is longer stays longer). With the
byte tokenizer and doc_length = seq_length - 1, each training sequence is then exactly one
document that starts at position 0, as the evaluation prompts do, and no fact is cut off by
a sequence boundary.

Document i depends only on (seed, i) and the options: a larger corpus with the same seed
starts with the same documents, and with all fractions 0 and no `doc_length` the documents
are the recall documents of earlier versions. The kind of document i is drawn from its own
random stream, so the recall documents of a mixed corpus equal those of an unmixed one.
"""

from hybrid_megatron.data.synthetic.corpus import (
    MIX_FIELDS,
    check_haystack,
    check_mix,
    document_kind,
    generate_corpus,
    iter_documents,
    smallest_document,
)
from hybrid_megatron.data.synthetic.formats import (
    KINDS,
    generate_copy_document,
    generate_niah_document,
    generate_passkey_document,
    generate_repeat_document,
)
from hybrid_megatron.data.synthetic.recall import Fact, SyntheticDocument, generate_document
from hybrid_megatron.data.synthetic.words import MIN_DISTANCE_FLOOR

__all__ = [
    "KINDS",
    "MIN_DISTANCE_FLOOR",
    "MIX_FIELDS",
    "Fact",
    "SyntheticDocument",
    "check_haystack",
    "check_mix",
    "document_kind",
    "generate_copy_document",
    "generate_corpus",
    "generate_document",
    "generate_niah_document",
    "generate_passkey_document",
    "generate_repeat_document",
    "iter_documents",
    "smallest_document",
]
