"""Build a small CLIP text encoder and a tokenizer whose vocabulary comes from your captions.

No download: the tokenizer's vocabulary is every word of the captions (whole words, so prompts
tokenize short), and the model is randomly initialised, meant to be trained jointly with the
UNet (`--train_text_encoder`), the way GLIDE trained its text transformer. The folder it writes
loads with the standard `CLIPTokenizer` / `CLIPTextModel.from_pretrained`, so the trainer and
the saved pipeline treat it like any other text encoder. Its token limit fits the longest caption
unless --max_length says otherwise (the trainer pads captions to at most that limit and cuts longer ones).

    python examples/make_text_encoder.py --captions data/shapes/metadata.jsonl --output_dir te
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def caption_words(captions: Iterable[str]) -> list[str]:
    """Distinct lower-case words and symbols as CLIP's pre-tokenizer splits them, sorted."""
    words = set()
    for caption in captions:
        words.update(WORD_PATTERN.findall(caption.lower()))
    return sorted(words)


def bpe_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A byte-level-free BPE that spells each word as one token (CLIP marks word ends with </w>)."""
    symbols = sorted({ch for word in words for ch in word})
    tokens = list(symbols) + [ch + "</w>" for ch in symbols]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged += piece
            if rule not in merges:
                merges.append(rule)
            if merged not in tokens:
                tokens.append(merged)
    tokens += SPECIAL_TOKENS
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_clip_tokenizer(words: list[str], output_dir: Path, max_length: int = 77):
    """Write vocab.json + merges.txt and load them back as a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    output_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocab_and_merges(words)
    (output_dir / "vocab.json").write_text(json.dumps(vocab))
    (output_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(output_dir, model_max_length=max_length, pad_token="<|endoftext|>")


def token_counts(tokenizer, captions: list[str]) -> list[int]:
    """Each caption's tokens under `tokenizer`, with the start and end tokens, not cut."""
    return [len(ids) for ids in tokenizer(captions, verbose=False)["input_ids"]]


def build_text_encoder(
    captions: Iterable[str],
    output_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_length: int | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised CLIPTextModel + CLIPTokenizer to `output_dir`; its token limit is
    `max_length`, or with None the longest caption's token count (start and end tokens included)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    output_dir, captions = Path(output_dir), list(captions)
    tokenizer = write_clip_tokenizer(caption_words(captions), output_dir)
    if max_length is None:
        max_length = max(token_counts(tokenizer, captions), default=2)
    tokenizer.model_max_length = max_length
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def captions_file_of(path: Path) -> Path | str:
    """The captions file --captions names (a dataset folder stands for its metadata.jsonl), or why there is none."""
    if path.is_dir():
        if (path / "metadata.jsonl").is_file():
            return path / "metadata.jsonl"
        return f"--captions {path}: a folder without a metadata.jsonl; pass a metadata.jsonl or a .txt of captions"
    if not path.is_file():
        return f"--captions {path}: no such file; pass a metadata.jsonl or a .txt file with one caption a line"
    return path


def read_captions(path: Path, column: str) -> list[str]:
    """Captions from a metadata.jsonl / .txt file (one per line); list cells are flattened."""
    if path.suffix != ".jsonl":
        return [line.strip() for line in path.read_text("utf-8-sig").splitlines() if line.strip()]
    captions: list[str] = []
    for line in path.read_text("utf-8-sig").splitlines():
        if line.strip():
            cell = json.loads(line).get(column) or ""
            captions.extend(cell if isinstance(cell, list) else [cell])
    return captions


def describe_limit(folder: Path, captions: list[str], requested: int | None) -> str:
    """The token limit written and where it came from; with --max_length, how many distinct captions it cuts."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    limit = tokenizer.model_max_length
    if requested is None:
        return f"token limit {limit}: the longest caption's tokens, with start and end"
    distinct = list(dict.fromkeys(captions))
    counts = token_counts(tokenizer, distinct)
    cut, longest = sum(count > limit for count in counts), max(counts, default=2)
    if not cut:
        return f"token limit {limit} (--max_length): every caption fits (the longest has {longest} tokens)"
    return (
        f"token limit {limit} (--max_length) cuts {cut} of {len(distinct)} distinct captions (the longest has"
        f" {longest} tokens); leave --max_length out to fit them all"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--captions",
        type=Path,
        required=True,
        help="metadata.jsonl (or the dataset folder holding it) or a .txt file with one caption a line.",
    )
    parser.add_argument("--caption_column", default="text", help="Caption key in metadata.jsonl.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="Longest prompt in tokens, with start and end (default: the longest caption's; longer ones are cut).",
    )
    args = parser.parse_args(argv)
    captions_file = captions_file_of(args.captions)
    if isinstance(captions_file, str):
        parser.error(captions_file)
    captions = read_captions(captions_file, args.caption_column)
    folder = build_text_encoder(
        captions, args.output_dir, args.hidden_size, args.num_layers, args.num_heads, args.max_length
    )
    print(f"wrote a {args.num_layers}-layer, {args.hidden_size}-wide CLIP text encoder to {args.output_dir}")
    print(describe_limit(folder, captions, args.max_length))


if __name__ == "__main__":
    main()
