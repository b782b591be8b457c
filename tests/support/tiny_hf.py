"""Write a tiny random-weight Hugging Face-format llama so vLLM tests run without downloading weights.

The directory holds what vLLM loads: config.json, safetensors weights and a fast tokenizer
(byte-level BPE trained here on a few sentences, so it encodes any text) with the chat template
of tests/support/tiny_gguf.py. Needs torch, transformers and tokenizers (the gpu extra).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_CORPUS = (
    "Hello the quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a dog who lived in a house near the big port.",
    "The people of the world call water, air and earth by many names.",
    "<|user|>\n<|assistant|>\n<|system|>\n",
)


def write_tiny_hf_llama(directory: str | Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """Write the model to `directory` (created if missing); deterministic for a given seed."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_positions
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 64: every vLLM attention backend takes it
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=bos_id,
        eos_token_id=bpe.token_to_id("</s>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random weights favour <unk> (shown as nothing): make it and <s> never win over text
        model.lm_head.weight[[bpe.token_to_id("<unk>"), bos_id]] = 0.0
    model.to(torch.float16).save_pretrained(target)
    return target
