"""Offline word-level tokenizers for tiny models.

A WordLevel model from the ``tokenizers`` library, wrapped in transformers' fast
tokenizer class. Named special tokens (``image_token``, ``boi_token``, ...) are
registered so that processors can read ``tok.image_token`` / ``tok.image_token_id``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

#: Words every tiny tokenizer knows, so prompts in tests, examples and docs tokenize.
BASE_WORDS: tuple[str, ...] = tuple(
    """
    user assistant system you are a an the is are what how many which where who of in on at to and or not
    yes no image picture photo describe color colour shape shapes count total there items item red green blue
    yellow purple orange black white gray circle circles square squares triangle triangles cell row column
    left right top bottom middle answer question number plus minus times more fewer than same different
    first second third same one two three four five six seven eight nine ten zero helpful please look
    think step by this that it its object objects do does has have with for as be can see
    System User Assistant SYSTEM USER ASSISTANT
    """.split()
)
PUNCTUATION: tuple[str, ...] = tuple(".,?!:;+-*/=()[]<>'\"#%&|_")
#: Whole numbers are single tokens, so answers such as "12" decode as written.
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(101))


def word_level_tokenizer(
    *,
    special_tokens: Mapping[str, str] | None = None,
    extra_special: Iterable[str] = (),
    words: Iterable[str] = BASE_WORDS,
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer entirely offline.

    Args:
        special_tokens: named multimodal tokens, e.g. ``{"image_token": "<image>"}``;
            each becomes an attribute (``tok.image_token``, ``tok.image_token_id``).
        extra_special: further special tokens (chat markers, row/column markers).
        words: the ordinary vocabulary; the numbers 0-100 and punctuation are always added
            (punctuation is split off words), so small arithmetic tokenizes.
        padding_side: ``"left"`` by default, as generation needs.

    Returns:
        A ``PreTrainedTokenizerFast`` whose ids are stable for the same arguments.
    """
    special_tokens = dict(special_tokens or {})
    fixed = [pad_token, unk_token, eos_token] + ([bos_token] if bos_token else [])
    specials: list[str] = []
    for token in [*fixed, *special_tokens.values(), *extra_special]:
        if token not in specials:
            specials.append(token)
    vocab: dict[str, int] = {}
    for token in [*specials, *NUMBERS, *PUNCTUATION, *words]:
        vocab.setdefault(token, len(vocab))

    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    model.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    model.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token=pad_token,
        unk_token=unk_token,
        bos_token=bos_token,
        eos_token=eos_token,
        extra_special_tokens=special_tokens,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )
    return tok
