"""The question/answer tests' tokenizer: whitespace word-level over a few words, optionally with a chat template."""

from transformers import PreTrainedTokenizerFast

from tests.helpers.tiny_models import word_tokenizer

WORDS = ["Question:", "Answer:", "who", "wrote", "it", "she", "did", "he", "a", "book", "<user>", "<bot>", "why"]
CHAT = "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <bot>{% endif %}"


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Whitespace word-level: [PAD]=0, [UNK]=1, [EOS]=2, then WORDS; with ``chat``, a chat template."""
    tok = word_tokenizer(WORDS, split_punctuation=False)
    if chat:
        tok.chat_template = CHAT
    return tok
