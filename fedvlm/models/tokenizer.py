"""Tokenizers: a pretrained one (hub id or local folder), or a word-level one built from text.

Pretrained text encoders come with their tokenizer. A randomly initialised encoder (the demo's
``bert_micro``) needs a vocabulary; :func:`build_word_tokenizer` makes a BERT-style word-level
tokenizer (lower-case, split on whitespace and punctuation, ``[CLS] … [SEP]``) from a corpus, so
whole numbers such as ``45`` stay single tokens. In a real federation the tokenizer is part of
the model artefact that every site receives; build it from public text, not from site data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedvlm.errors import ConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_word_tokenizer(texts: Iterable[str], min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer whose vocabulary is every word of ``texts``.

    Args:
        texts: The corpus (e.g. a generator's template vocabulary, or training reports).
        min_frequency: Words seen fewer times map to ``[UNK]``.

    Example:
        >>> tok = build_word_tokenizer(["Blasts 45% on smear", "no blasts seen"])
        >>> tok.convert_ids_to_tokens(tok("blasts 45 %, fever")["input_ids"])  # "," and "fever" unseen
        ['[CLS]', 'blasts', '45', '%', '[UNK]', '[UNK]', '[SEP]']
    """
    normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = normalizer.normalize_str(text)
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalized))
    words = sorted(word for word, count in counts.items() if count >= min_frequency)
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or a local folder (as saved by ``save_pretrained``).

    Raises:
        ConfigError: If it is neither a local folder nor reachable on the hub.
    """
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except OSError as err:
        raise ConfigError(
            f"tokenizer {str(source)!r} is neither a local folder nor reachable on the hub "
            f"({str(err).strip().splitlines()[0]}); set model.text_encoder.tokenizer to a local folder"
        ) from None
