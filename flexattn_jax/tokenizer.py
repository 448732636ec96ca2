"""A tiny local tokenizer for tests and the demo (no downloads), and the loader of real ones.

Byte-level BPE (GPT-2 style pre-tokenizer, every one of the 256 bytes in the base alphabet, so any
text tokenizes and decodes back exactly) trained on a small word list, so that the template words
and the demo's questions and answers are single tokens. Special tokens, in this order:
``<unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4``. Encoding adds ``<s>`` at the start (like Llama).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flexattn_jax.preprocess import ROLES, SYSTEM_PROMPT, SYSTEM_PROMPT_VICUNA_V1

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IMAGE)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)


def default_words(extra: Sequence[str] = ()) -> list[str]:
    """Texts covering the LLaVA v1 templates, then ``extra`` (the demo passes its questions and answers),
    then a few common words."""
    texts = [SYSTEM_PROMPT, SYSTEM_PROMPT_VICUNA_V1, f"{ROLES[0]}: ", f" {ROLES[1]}:", f" {ROLES[1]}: "]
    texts += list(extra)
    texts += ["yes", "no", "the", "a", "an", "is", "what", "which", "image", "picture", "square", "pattern", "small",
              "Answer the question using a single word or phrase.", "0 1 2 3 4 5 6 7 8 9"]
    return texts


def build_tokenizer(
    words: Sequence[str] | None = None,
    model_max_length: int = 2048,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``words`` (default :func:`default_words`) and wrap it for transformers.

    Each entry is learnt both as is and with a leading space, so every word of it becomes one token.
    The result is deterministic for a given word list.
    """
    words = list(default_words() if words is None else words)
    corpus: list[str] = []
    for w in words:
        corpus += [w, " " + w]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # never reached: training stops when every pre-token is a single symbol
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name!r} got id {tok.token_to_id(name)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


class TokenizerError(ValueError):
    """A tokenizer is missing, unreadable or does not fit the model; the message names the directory."""


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tiktoken.model", "tokenizer_config.json")
"""Files that hold a vocabulary: a tokenizer directory has at least one."""
TOKENIZER_FILES = (
    *VOCABULARY_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
"""Every tokenizer / processor file a model directory carries along (copied by the converter and the export)."""


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a missing or broken tokenizer names ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise TokenizerError(f"{path}: no tokenizer files (looked for {', '.join(VOCABULARY_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError/OSError/ImportError with advice unrelated to the cause
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TokenizerError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {first})") from e


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int) -> None:
    """Every id the tokenizer can produce must have an embedding row: ``len(tokenizer) <= vocab_size``.

    A larger tokenizer would index past the embedding (garbage, or a crash on device). Used by
    ``generate`` and ``train`` alike.
    """
    n = len(tokenizer)
    if n > vocab_size:
        raise TokenizerError(
            f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size} (text.vocab_size): "
            "wrong tokenizer for this checkpoint?"
        )
