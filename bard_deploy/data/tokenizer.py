"""The embedded default's tokenizer and image processor, built offline and saved in HF format.

A word-level tokenizer (the `tokenizers` library) over the synthetic task's words, with Qwen's chat special
tokens and a `<|mask|>` token, plus a Qwen-style chat template; and the Qwen2-VL image processor (PIL variant)
configured for the task's small images. Both are saved into every checkpoint directory, so loading goes
through `AutoTokenizer` / the processor class exactly as for a real Qwen3-VL checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from bard_deploy.data.synthetic import IMAGE_SIZE, vocabulary_words

SPECIAL_TOKENS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|mask|>")
PUNCTUATION = tuple(".,?!:;'\"-()")
# Qwen's template, reduced to what the task needs: string or list content, image and video parts, generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_MULTIPLE = 64


def vocabulary() -> list[str]:
    """The tokenizer's tokens in id order: special tokens first (stable ids), punctuation, digits and letters,
    then every task word in lower case and capitalised."""
    words = vocabulary_words()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    tokens = list(SPECIAL_TOKENS) + list(PUNCTUATION) + digits + letters
    for w in words + [w.capitalize() for w in words]:
        if w not in tokens:
            tokens.append(w)
    return tokens


def word_level_tokenizer(vocab: dict[str, int], specials: list, unk: str, model_max_length: int,
                         extra_special_tokens: dict[str, str]):
    """A PreTrainedTokenizerFast over a word-level vocabulary (whitespace split, unknown words -> `unk`, clean
    decoding of punctuation), `specials` added after it, Qwen's pad / EOS tokens and our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)   # joins words with spaces, "a ." -> "a."
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, extra_special_tokens=extra_special_tokens,
    )


def build_tokenizer():
    """The embedded default's tokenizer: word level over the task's vocabulary, unknown words -> <unk>."""
    return word_level_tokenizer({t: i for i, t in enumerate(vocabulary())}, list(SPECIAL_TOKENS), "<unk>", 4096,
                                {"mask_token": "<|mask|>"})


def padded_vocab_size(tokenizer) -> int:
    """The model's vocab_size: len(tokenizer) rounded up to a multiple of VOCAB_MULTIPLE (aligned embedding and
    head shapes, as Qwen pads its own); the extra ids are never produced."""
    n = len(tokenizer)
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_image_processor():
    """Qwen2-VL's processor (PIL variant: torchvision does not import beside the disk torch) for the task's
    96 x 96 images: patch 16, temporal patch 2, merge 2, mean/std 0.5 as Qwen3-VL."""
    from transformers import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                    min_pixels=pixels // 4, max_pixels=pixels * 4,
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def save_processing_files(directory: str | Path) -> None:
    """Write tokenizer and preprocessor files into a (checkpoint) directory."""
    build_tokenizer().save_pretrained(directory)
    build_image_processor().save_pretrained(directory)
